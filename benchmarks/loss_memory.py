"""Per-device temporary memory of ``value_and_grad`` of a loss, lean vs global-view reference.

Reads the compiled program's memory analysis (deterministic, no timing) on a mesh of
simulated devices, for every loss with a memory-lean ring form: CLIP, SigLIP, NT-Xent and
DCL (inputs ``[B, D]``), DreamLIP's multi-positive term (``[B, 4, D]`` texts) and FILIP
(tokens ``[B, T_img, D]``, ``[B, T_txt, D]`` and a text mask). Two tables: memory over the
global batch on ``--devices`` devices with the log-log slope (goal for the lean form: ≤ 1.05),
and memory at the largest batch over the device count, compiled on the first ``W`` devices
(goal: slope ≤ −0.9). ``benchmarks/run.py`` runs it as its ``loss_memory`` part.

  python benchmarks/loss_memory.py                  # the full sizes (FULL below)
  python benchmarks/loss_memory.py --batches 1024,2048 --device_counts 2,8 --dim 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _ints(text):
  return [int(v) for v in text.split(",") if v]


def _mib(n):
  return f"{n / 2**20:.2f}"


GOAL_BATCH_SLOPE = 1.05  # lean form, log-log slope of memory in the global batch
GOAL_DEVICE_SLOPE = -0.9  # lean form, log-log slope of memory in the device count

QUICK = dict(batches=(256, 512), dim=32, block_size=16, filip_batches=(32, 64),
             image_tokens=4, text_tokens=4, filip_block_size=4, device_counts=(1, 2, 4, 8))
FULL = dict(batches=(2048, 4096, 8192), dim=256, block_size=64, filip_batches=(512, 1024, 2048),
            image_tokens=16, text_tokens=8, filip_block_size=16, device_counts=(1, 2, 4, 8))


def run(quick: bool = False, *, devices: int = 8, **overrides) -> dict:
  """Both tables for every loss with a lean form, as a JSON-serialisable dict:
  ``{"settings", "batch": {loss: {rows, slope_reference, slope_lean, met}},
  "devices": {loss: {global_batch, rows, slope_reference, slope_lean, met}}}`` with rows of
  ``[B or W, reference_bytes, lean_bytes]`` per device (multi-positive: 4 texts per image).
  Needs ``max(device_counts)`` devices."""
  from contrastive_jax.losses import memory_profile
  settings = dict(QUICK if quick else FULL, **overrides)
  tokens = dict(image_tokens=settings["image_tokens"], text_tokens=settings["text_tokens"])
  out = {"settings": dict(settings, devices=devices), "batch": {}, "devices": {}}
  for name in (memory_profile.LOSSES + memory_profile.MULTI_POSITIVE_LOSSES
               + memory_profile.TOKEN_LOSSES):
    token = name in memory_profile.TOKEN_LOSSES
    batches = settings["filip_batches" if token else "batches"]
    block = settings["filip_block_size" if token else "block_size"]
    rows = memory_profile.memory_table(name, batches, settings["dim"], devices, block, **tokens)
    ref, lean = memory_profile.loglog_slopes(rows)
    out["batch"][name] = {"rows": [list(map(int, r)) for r in rows], "slope_reference": ref,
                          "slope_lean": lean, "met": lean <= GOAL_BATCH_SLOPE}
    rows = memory_profile.device_table(name, max(batches), settings["device_counts"],
                                       settings["dim"], block, **tokens)
    ref, lean = memory_profile.loglog_slopes(rows)
    # One device needs no ring buffers (no [b, D] shard or gradient in flight), so the slope
    # over W ≥ 2 is reported too: how the ring itself scales.
    multi = [r for r in rows if r[0] > 1]
    lean_multi = memory_profile.loglog_slopes(multi)[1] if len(multi) > 1 else None
    out["devices"][name] = {"global_batch": max(batches),
                            "rows": [list(map(int, r)) for r in rows], "slope_reference": ref,
                            "slope_lean": lean, "slope_lean_multi_device": lean_multi,
                            "met": lean <= GOAL_DEVICE_SLOPE}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="the small sizes of run.py --quick")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batches", default=None, help="embedding losses' global batches")
  parser.add_argument("--dim", type=int, default=None)
  parser.add_argument("--block_size", type=int, default=None)
  parser.add_argument("--filip_batches", default=None, help="token losses' global batches")
  parser.add_argument("--image_tokens", type=int, default=None, help="FILIP tokens per image")
  parser.add_argument("--text_tokens", type=int, default=None, help="FILIP tokens per text")
  parser.add_argument("--filip_block_size", type=int, default=None,
                      help="FILIP ring row block (live tensor block x b x T_img x T_txt)")
  parser.add_argument("--device_counts", default=None,
                      help="device counts of the fixed-batch table (at the largest batch)")
  parser.add_argument("--output", default=None, help="JSON file")
  args = parser.parse_args(argv)
  overrides = {k: (_ints(v) if k in ("batches", "filip_batches", "device_counts") else v)
               for k, v in vars(args).items()
               if v is not None and k not in ("quick", "devices", "output")}
  counts = overrides.get("device_counts", (QUICK if args.quick else FULL)["device_counts"])
  flag = f"--xla_force_host_platform_device_count={max([args.devices] + list(counts))}"
  if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  result = run(args.quick, devices=args.devices, **overrides)
  print(f"value_and_grad, per-device temp MiB; settings {result['settings']}")
  print("| loss | global batch | reference | ring (lean) |")
  print("|---|---|---|---|")
  for name, entry in result["batch"].items():
    for b, ref, lean in entry["rows"]:
      print(f"| {name} | {b} | {_mib(ref)} | {_mib(lean)} |")
    print(f"| {name} | log-log slope | {entry['slope_reference']:.2f} | "
          f"{entry['slope_lean']:.2f} |")
  print()
  print("| loss | global batch | devices | reference | ring (lean) |")
  print("|---|---|---|---|---|")
  for name, entry in result["devices"].items():
    for w, ref, lean in entry["rows"]:
      print(f"| {name} | {entry['global_batch']} | {w} | {_mib(ref)} | {_mib(lean)} |")
    print(f"| {name} | {entry['global_batch']} | log-log slope | "
          f"{entry['slope_reference']:.2f} | {entry['slope_lean']:.2f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
