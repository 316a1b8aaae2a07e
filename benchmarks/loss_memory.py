"""Per-device temporary memory of ``value_and_grad`` of a loss, lean vs global-view reference.

Reads the compiled program's memory analysis (deterministic, no timing) for each global batch
on a mesh of simulated devices and prints markdown tables: CLIP and SigLIP over the batch
(inputs ``[B, D]``), FILIP over the batch (token inputs ``[B, T_img, D]``, ``[B, T_txt, D]``
and a text mask), each with the log-log slope in the batch, and every loss at a fixed batch
over the device count (compiled on the first ``W`` devices).

  python benchmarks/loss_memory.py --devices 8 --batches 2048,4096,8192 --dim 256 \\
      --filip_batches 512,1024,2048 --image_tokens 16 --text_tokens 8 --device_counts 2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys


def _ints(text):
  return [int(v) for v in text.split(",") if v]


def _mib(n):
  return f"{n / 2**20:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batches", default="2048,4096,8192",
                      help="CLIP/SigLIP global batches (empty: skip them)")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--block_size", type=int, default=64)
  parser.add_argument("--filip_batches", default="512,1024,2048",
                      help="FILIP global batches (empty: skip it)")
  parser.add_argument("--image_tokens", type=int, default=16, help="FILIP tokens per image")
  parser.add_argument("--text_tokens", type=int, default=8, help="FILIP tokens per text")
  parser.add_argument("--filip_block_size", type=int, default=16,
                      help="FILIP ring row block (live tensor block x b x T_img x T_txt)")
  parser.add_argument("--device_counts", default="2,4,8",
                      help="device counts of the fixed-batch table (empty: skip it); the batch "
                           "is the largest of --batches / --filip_batches")
  args = parser.parse_args(argv)
  counts = _ints(args.device_counts)
  total = max([args.devices] + counts)
  flag = f"--xla_force_host_platform_device_count={total}"
  if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  from contrastive_jax.losses import memory_profile  # imports jax after the flag is set
  batches, filip_batches = _ints(args.batches), _ints(args.filip_batches)
  tokens = dict(image_tokens=args.image_tokens, text_tokens=args.text_tokens)
  blocks = {name: args.block_size for name in memory_profile.LOSSES}
  blocks.update({name: args.filip_block_size for name in memory_profile.TOKEN_LOSSES})

  print(f"value_and_grad, {args.devices} devices, D={args.dim}, block {args.block_size} "
        f"(FILIP: {args.image_tokens} image / {args.text_tokens} text tokens, block "
        f"{args.filip_block_size}): per-device temp MiB")
  print("| loss | global batch | reference | ring (lean) |")
  print("|---|---|---|---|")
  for name in memory_profile.LOSSES + memory_profile.TOKEN_LOSSES:
    loss_batches = filip_batches if name in memory_profile.TOKEN_LOSSES else batches
    if not loss_batches:  # an empty batch list skips that family
      continue
    rows = memory_profile.memory_table(name, loss_batches, args.dim, args.devices,
                                       blocks[name], **tokens)
    for b, ref, lean in rows:
      print(f"| {name} | {b} | {_mib(ref)} | {_mib(lean)} |")
    if len(rows) > 1:
      ref_slope, lean_slope = memory_profile.loglog_slopes(rows)
      print(f"| {name} | log-log slope | {ref_slope:.2f} | {lean_slope:.2f} |")

  if counts:
    print()
    print(f"per-device temp MiB vs device count at a fixed global batch (D={args.dim})")
    print("| loss | global batch | devices | reference | ring (lean) |")
    print("|---|---|---|---|---|")
    for name in memory_profile.LOSSES + memory_profile.TOKEN_LOSSES:
      loss_batches = filip_batches if name in memory_profile.TOKEN_LOSSES else batches
      if not loss_batches:
        continue
      batch = max(loss_batches)
      rows = memory_profile.device_table(name, batch, counts, args.dim, blocks[name], **tokens)
      for w, ref, lean in rows:
        print(f"| {name} | {batch} | {w} | {_mib(ref)} | {_mib(lean)} |")


if __name__ == "__main__":
  main()
