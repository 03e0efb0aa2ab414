r"""Benchmark-only reference: one federated LoRA round in eager PyTorch + peft.

This is the baseline the JAX round (`softjax.federated.round.make_round`) is timed against. It does
what Flower / OpenFedLLM-style simulations do: a sequential Python loop over the sampled
clients, each loading the global adapter + head into one shared peft model, taking E eager SGD
steps and handing back its update; the server then adds the data-size-weighted mean update to
the global state (FedAvg on the trainable tensors, ALGORITHM.md section 3).

It mirrors softjax's computation, not its numbers: same ViT architecture and sizes
(`softjax.models.vit.VARIANTS`), same trainable set (LoRA factors on the target projections and
the classifier head, backbone frozen), same preprocessing, batch order (a random permutation
per client and round, walked without replacement) and loss weighting. Initialisation follows
peft's defaults (B = 0), the backbone is random. Nothing here is used by softjax itself.

  python -m experiments.torch_reference --variant=cpu_small --clients=5 --local_steps=5 \
      --batch_size=32 --rounds=3
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
import json
import statistics
import time

import numpy as np
import peft
import torch
from torch import nn
import torch.nn.functional as F

from softjax.models.vit import LORA_TARGETS, VARIANTS

State = dict[str, torch.Tensor]
ClientData = tuple[np.ndarray, np.ndarray]  # (uint8 images [n, H, W, C], int labels [n])
RoundFn = Callable[[State, Sequence[ClientData]], tuple[State, float]]

HEAD = "head"  # Module name of the classifier; trained through peft's modules_to_save.
_LN_EPSILON = 1e-6  # As in softjax.models.vit (the public ViT checkpoints' epsilon).

# softjax target name -> names of the nn.Linear modules it adapts in `_ViT`.
_PEFT_MODULES: dict[str, tuple[str, ...]] = {
    "query": ("query",), "key": ("key",), "value": ("value",), "out": ("out",),
    "mlp": ("fc1", "fc2"),
}


class _Attention(nn.Module):
  """Multi-head self-attention with separate query/key/value/out projections (with bias)."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [B, L, D] -> [B, L, D]; scores scaled by 1/sqrt(head_dim) like softjax."""
    b, l, d = x.shape

    def heads(t):  # [B, L, D] -> [B, N, L, H]
      return t.view(b, l, self.num_heads, d // self.num_heads).transpose(1, 2)

    y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                       heads(self.value(x)))
    return self.out(y.transpose(1, 2).reshape(b, l, d))


class _Block(nn.Module):
  """Pre-LayerNorm encoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int):
    super().__init__()
    self.ln1 = nn.LayerNorm(width, eps=_LN_EPSILON)
    self.attn = _Attention(width, num_heads)
    self.ln2 = nn.LayerNorm(width, eps=_LN_EPSILON)
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln1(x))
    # softjax (like the public checkpoints) uses the tanh approximation of GELU.
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class _ViT(nn.Module):
  """The ViT of softjax.models.vit.VisionTransformer, cls-token pooling, channels-last input."""

  def __init__(self, *, image_size: int, channels: int, num_classes: int, patch_size: int,
               width: int, depth: int, num_heads: int, mlp_dim: int):
    super().__init__()
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}.")
    if width % num_heads:
      raise ValueError(f"width={width} is not divisible by num_heads={num_heads}.")
    seq_len = (image_size // patch_size)**2 + 1
    self.embedding = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
    self.cls = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, seq_len, width))
    self.blocks = nn.ModuleList(_Block(width, num_heads, mlp_dim) for _ in range(depth))
    self.encoder_norm = nn.LayerNorm(width, eps=_LN_EPSILON)
    self.head = nn.Linear(width, num_classes)
    # Zero head, as softjax (and ViT fine-tuning) initialises it.
    nn.init.zeros_(self.head.weight)
    nn.init.zeros_(self.head.bias)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """images: float [B, H, W, C] -> logits [B, num_classes]."""
    x = self.embedding(images.permute(0, 3, 1, 2))  # [B, D, h, w]
    x = x.flatten(2).transpose(1, 2)  # [B, h * w, D], row-major patches as in softjax
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
    for block in self.blocks:
      x = block(x)
    return self.head(self.encoder_norm(x)[:, 0])


def build_model(variant: str, image_size: int, channels: int, num_classes: int, rank: int,
                alpha: float, targets: tuple[str, ...] = ("query", "value")) -> nn.Module:
  """Builds the ViT of `variant` and wraps it with peft LoRA adapters.

  Args:
    variant: a key of `softjax.models.vit.VARIANTS` ("tiny", "cpu_small", "B/16").
    image_size: side of the square input image.
    channels: input channels.
    num_classes: classifier outputs.
    rank: LoRA rank r.
    alpha: LoRA alpha (scale alpha / r, as in softjax).
    targets: softjax target names (query, key, value, out, mlp); empty = head only.

  Returns:
    The `peft.PeftModel`: backbone frozen, LoRA factors and a trainable copy of the head
    (peft's `modules_to_save`) have `requires_grad`. It takes float images [B, H, W, C].

  Raises:
    ValueError: unknown variant or target.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; allowed: {', '.join(sorted(VARIANTS))}.")
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if unknown:
    raise ValueError(f"Unknown LoRA targets {unknown}; allowed: {', '.join(LORA_TARGETS)}.")
  base = _ViT(image_size=image_size, channels=channels, num_classes=num_classes,
              **VARIANTS[variant])
  modules = [m for t in targets for m in _PEFT_MODULES[t]]
  if not modules:
    # peft refuses an empty target list; head-only fine-tuning needs no adapter at all.
    base.requires_grad_(False)
    base.head.requires_grad_(True)
    return base
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                           bias="none", modules_to_save=[HEAD])
  return peft.get_peft_model(base, config)


def trainable_state(model: nn.Module) -> State:
  """A detached copy of every trainable tensor (LoRA factors and head), by parameter name."""
  return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def trainable_count(model: nn.Module) -> int:
  """Number of values that train: LoRA factors plus the head (frozen copies not counted)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def preprocess(images_uint8: np.ndarray) -> torch.Tensor:
  """uint8 [..., H, W, C] -> float32 in [-1, 1], `(x / 255 - 0.5) / 0.5` as softjax does."""
  x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(torch.float32).div_(255.0)
  return x.sub_(0.5).div_(0.5)


@torch.no_grad()
def aggregate(global_state: Mapping[str, torch.Tensor],
              client_states: Sequence[Mapping[str, torch.Tensor]],
              counts: Sequence[int]) -> State:
  """Server step: global + sum_k p_k (local_k - global) with p_k = n_k / sum_j n_j.

  Args:
    global_state: the round's starting trainable tensors.
    client_states: each client's trainable tensors after local training (same keys).
    counts: each client's number of examples n_k.

  Returns:
    The new global state (new tensors; the inputs are not modified).

  Raises:
    ValueError: no clients, mismatched lengths, or all counts zero.
  """
  if not client_states or len(client_states) != len(counts):
    raise ValueError(f"Need one count per client state; got {len(client_states)} states and "
                     f"{len(counts)} counts.")
  total = float(sum(counts))
  if total <= 0:
    raise ValueError(f"Client counts sum to {total}; nothing to aggregate.")
  weights = [n / total for n in counts]
  new_state = {}
  for name, g in global_state.items():
    update = torch.zeros_like(g)
    for w, local in zip(weights, client_states):
      update.add_(local[name] - g, alpha=w)
    new_state[name] = g + update
  return new_state


def make_round(model: nn.Module, *, local_steps: int, batch_size: int, lr: float,
               seed: int = 0) -> RoundFn:
  """Builds round_fn(global_state, client_data) -> (new_global_state, mean_loss).

  For each client in order: copy `global_state` into the model's trainable parameters, take
  `local_steps` plain-SGD steps on batches of `batch_size` (a fresh random permutation of the
  client's examples, walked without replacement and wrapping around), keep the trained tensors.
  Then `aggregate` them with data-size weights. `mean_loss` is the data-size-weighted mean over
  clients of each client's mean training loss (as softjax's train_loss).

  Args:
    model: a model from `build_model`; it is trained in place (one model shared by clients).
    local_steps: E.
    batch_size: b.
    lr: client learning rate.
    seed: seed of the batch orders; each call of round_fn draws new ones.

  Returns:
    The round function. `global_state` must have the keys of `trainable_state(model)`.
  """
  params = {name: p for name, p in model.named_parameters() if p.requires_grad}
  device = next(model.parameters()).device
  optimizer = torch.optim.SGD(list(params.values()), lr=lr)  # stateless: one for all clients
  rng = np.random.default_rng(seed)

  def client_update(global_state: State, images: np.ndarray,
                    labels: np.ndarray) -> tuple[State, float]:
    with torch.no_grad():
      for name, p in params.items():
        p.copy_(global_state[name])
    n = len(labels)
    order = rng.permutation(n)
    losses = []
    model.train()
    for step in range(local_steps):
      idx = order[(step * batch_size + np.arange(batch_size)) % n]
      x = preprocess(images[idx]).to(device)
      y = torch.from_numpy(np.asarray(labels[idx], np.int64)).to(device)
      optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()
      losses.append(loss.detach())
    local = {name: p.detach().clone() for name, p in params.items()}
    return local, torch.stack(losses).mean().item()

  def round_fn(global_state: State,
               client_data: Sequence[ClientData]) -> tuple[State, float]:
    client_states, losses, counts = [], [], []
    for images, labels in client_data:
      local, loss = client_update(global_state, images, labels)
      client_states.append(local)
      losses.append(loss)
      counts.append(len(labels))
    new_state = aggregate(global_state, client_states, counts)
    total = float(sum(counts))
    mean_loss = sum(n / total * l for n, l in zip(counts, losses))
    return new_state, mean_loss

  return round_fn


def make_client_data(clients: int, examples_per_client: int, image_size: int, channels: int,
                     num_classes: int, seed: int = 0) -> list[ClientData]:
  """Random uint8 images [n, H, W, C] and int32 labels [n] for each client."""
  rng = np.random.default_rng(seed)
  shape = (examples_per_client, image_size, image_size, channels)
  return [(rng.integers(0, 256, shape, dtype=np.uint8),
           rng.integers(0, num_classes, examples_per_client, dtype=np.int32))
          for _ in range(clients)]


@dataclasses.dataclass(frozen=True)
class Setting:
  """The federated workload timed; defaults are softjax's CPU setting.

  cpu_small on 28x28x1, rank 8, alpha 32, K = 5, E = 5, b = 32, lr 0.03; 1500 examples a
  client = half of Fashion-MNIST's 60k over 20 clients.

  Attributes:
    variant, image_size, channels, num_classes, rank, alpha, targets: the model (build_model).
    clients: K, clients per round (each holds `examples_per_client` examples).
    local_steps, batch_size, lr: local training (make_round).
    examples_per_client: n_k.
    seed: seed of the model init, the data and the batch orders.
  """

  variant: str = "cpu_small"
  image_size: int = 28
  channels: int = 1
  num_classes: int = 10
  rank: int = 8
  alpha: float = 32.0
  targets: tuple[str, ...] = ("query", "value")
  clients: int = 5
  local_steps: int = 5
  batch_size: int = 32
  examples_per_client: int = 1500
  lr: float = 0.03
  seed: int = 0


def time_rounds(setting: Setting = Setting(), rounds: int = 3, warmup: int = 1,
                threads: int | None = None) -> dict:
  """Times `warmup + rounds` federated rounds of `setting`; the first `warmup` are not counted.

  Data generation and model building are not timed; each round includes the uint8 -> float
  conversion of its batches, the loads of the global state and the server step.

  Args:
    setting: the workload.
    rounds: timed rounds (>= 1).
    warmup: untimed rounds before them.
    threads: `torch.set_num_threads` value; None leaves torch's default.

  Returns:
    {"round_s": median seconds per timed round, "round_s_all": every timed round,
     "warmup_s": the warm-up rounds, "loss": last round's mean loss, "trainable": int,
     "torch_version", "peft_version", "threads", and the settings}.
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f"Need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}.")
  if threads is not None:
    torch.set_num_threads(threads)
  w = setting
  torch.manual_seed(w.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the GPU variant
  model = build_model(w.variant, w.image_size, w.channels, w.num_classes, w.rank, w.alpha,
                      w.targets).to(device)
  data = make_client_data(w.clients, w.examples_per_client, w.image_size, w.channels,
                          w.num_classes, w.seed)
  round_fn = make_round(model, local_steps=w.local_steps, batch_size=w.batch_size, lr=w.lr,
                        seed=w.seed)
  state = trainable_state(model)
  times, loss = [], float("nan")
  for _ in range(warmup + rounds):
    start = time.perf_counter()
    state, loss = round_fn(state, data)  # .item() of the loss waits for the device
    times.append(time.perf_counter() - start)
  timed = times[warmup:]
  return {
      "round_s": statistics.median(timed),
      "round_s_all": timed,
      "warmup_s": times[:warmup],
      "loss": loss,
      "trainable": trainable_count(model),
      "torch_version": torch.__version__,
      "peft_version": peft.__version__,
      "threads": torch.get_num_threads(),
      "device": str(device),
      **{k: v for k, v in dataclasses.asdict(w).items() if k != "seed"},
      "targets": list(w.targets),
  }


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: times the rounds and prints the record as JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="cpu_small", choices=sorted(VARIANTS))
  parser.add_argument("--image_size", type=int, default=28)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=32.0)
  parser.add_argument("--targets", default="query,value",
                      help="comma list of query,key,value,out,mlp; '' = head only")
  parser.add_argument("--clients", type=int, default=5)
  parser.add_argument("--local_steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--examples_per_client", type=int, default=1500)
  parser.add_argument("--lr", type=float, default=0.03)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads; default: torch's own")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="also write the JSON record here")
  args = parser.parse_args(argv)
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  fields = {f.name for f in dataclasses.fields(Setting)} - {"targets"}
  setting = Setting(targets=targets, **{k: v for k, v in vars(args).items() if k in fields})
  record = time_rounds(setting, rounds=args.rounds, warmup=args.warmup, threads=args.threads)
  text = json.dumps(record, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
