r"""Benchmark: client compression time of SOFT's norm-product scoring vs SLoRA's product + SVD.

Default: ViT-B/16 dimensions (d = 768, 24 target matrices = query and value of 12 blocks) at
ranks 4, 8, 16, 64; the ratio slora / soft is measured in one process on one machine.

  python -m experiments.compression_benchmark --out=/tmp/compression.json
"""


from absl import flags

from experiments import common, compression_cost

_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")
_RANKS = flags.DEFINE_list("ranks", ["4", "8", "16", "64"], "LoRA ranks.")
_DIM = flags.DEFINE_integer("dim", 768, "d_in = d_out of every adapted matrix.")
_LAYERS = flags.DEFINE_integer("layers", 24, "Number of adapted matrices.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).")


def main(argv):
  del argv
  records = compression_cost.compare([int(r) for r in _RANKS.value], dim=_DIM.value,
                                     layers=_LAYERS.value, repeats=_REPEATS.value)
  for r in records:
    print(f"rank {r['rank']:3d}: soft {r['soft_s'] * 1e3:8.2f} ms | slora "
          f"{r['slora_s'] * 1e3:8.2f} ms | slora/soft {r['slora_over_soft']:7.1f}x")
  common.write_json(_OUT.value, records)


if __name__ == "__main__":
  common.run_launcher(main)
