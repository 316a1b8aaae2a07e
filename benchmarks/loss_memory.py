"""Per-device temporary memory of ``value_and_grad`` of a loss, lean vs global-view reference.

Reads the compiled program's memory analysis (deterministic, no timing) for each global batch
on a mesh of simulated devices, prints a markdown table and the log-log slope in the batch.

  python benchmarks/loss_memory.py --devices 8 --batches 2048,4096,8192 --dim 256
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batches", default="2048,4096,8192")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--block_size", type=int, default=64)
  args = parser.parse_args(argv)
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  from contrastive_jax.losses import memory_profile  # imports jax after the flag is set
  batches = [int(b) for b in args.batches.split(",")]
  print(f"value_and_grad, {args.devices} devices, D={args.dim}, block {args.block_size}: "
        "per-device temp MiB")
  print("| loss | global batch | reference | ring (lean) |")
  print("|---|---|---|---|")
  for name in memory_profile.LOSSES:
    rows = memory_profile.memory_table(name, batches, args.dim, args.devices, args.block_size)
    for b, ref, lean in rows:
      print(f"| {name} | {b} | {ref / 2**20:.2f} | {lean / 2**20:.2f} |")
    ref_slope, lean_slope = memory_profile.loglog_slopes(rows)
    print(f"| {name} | log-log slope | {ref_slope:.2f} | {lean_slope:.2f} |")


if __name__ == "__main__":
  main()
