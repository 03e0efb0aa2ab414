"""Vision Transformer with LoRA adapters (vit), its parameter pytrees (lora), and loading of
standard ViT .npz checkpoints (checkpoint)."""
