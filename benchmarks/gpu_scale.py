"""CLIP ViT-B/16 on an accelerator: model FLOPs utilisation and the largest trainable batch.

1. **MFU**: the library's CLIP train step (the jitted :func:`train_state.sharded_train_step`
   of :func:`train_state.make_step`, mode ``jit``, one mesh over the local devices), ViT-B/16
   in bfloat16, per-device batch 256, synthetic batches made on the devices (no TensorFlow).
   FLOPs per step: an analytic count (all matmuls of both towers with attention scores, the
   projections, the loss's logits; forward × 3) and ``cost_analysis()`` of the compiled step;
   MFU uses the analytic one (the compiler adds element-wise work and counts a loop body
   once). Peak: the device kind's published bf16 dense peak (:data:`PEAK_BF16`) or
   ``--peak_tflops``.
2. **Largest batch**: the same step with GradCache (``accum_steps`` keep each micro-batch at
   the per-device batch) and the ring loss (``block_size`` rows at a time), the global batch
   growing ``factor`` × per try up to ``max_batch``: compile (memory analysis), the loss's own
   compiled temp memory on one device, one timed step (loss finite). Stops at the first
   failure (out of memory, compile error); skips batches whose estimated time exceeds what is
   left of ``max_seconds``. The whole global batch lives on the devices, so images are uint8
   pixels by default (the model casts them to its compute dtype).

  python benchmarks/gpu_scale.py [--quick] [--output F.json] [--max_seconds 480]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import types
from typing import Callable, Optional, Sequence

if __name__ == "__main__":  # before JAX is imported: simulated CPU devices, GPU memory share
  _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--cpu_devices=")), "")
  if _n:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}").strip()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastive_jax import clip_config, optim, parallel, partitioning, train_state  # noqa: E402
from contrastive_jax.losses import memory_profile  # noqa: E402
from contrastive_jax.losses.clip_ring import ring_clip_loss  # noqa: E402
from contrastive_jax.objectives import make_objective  # noqa: E402

# bfloat16 dense (no sparsity) peak FLOP/s per device, by jax ``device_kind`` (lower case,
# first match wins). NVIDIA datasheets (H100/H200 SXM 989 TF, H100 PCIe 756 TF, A100 312 TF,
# L4 121 TF: half the "with sparsity" figures), Cloud TPU docs (v4 275, v5e 197, v5p 459,
# v6e 918 TF per chip). JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
PEAK_BF16 = (
    (r"h100 pcie", 756e12), (r"h100 nvl", None), (r"h100|h200", 989e12), (r"a100", 312e12),
    (r"\bl4\b", 121e12), (r"tpu v4$", 275e12), (r"tpu v5 ?lite|tpu v5e", 197e12),
    (r"tpu v5p?$", 459e12), (r"tpu v6 ?lite|tpu v6e", 918e12),
)
VOCAB = {"clip_bpe": 49408, "bytes": 258}
GOAL_BATCH, GOAL_LOSS_BYTES = 262_144, 1e9
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def peak_flops(device_kind: str, peak_tflops: Optional[float] = None):
  """``(peak FLOP/s per device or None, where it comes from / why there is none)``."""
  if peak_tflops:
    return peak_tflops * 1e12, "--peak_tflops"
  kind = device_kind.lower()
  for pattern, value in PEAK_BF16:
    if re.search(pattern, kind):
      if value is None:
        break
      return value, f"published bf16 dense peak of {device_kind!r}"
  return None, f"no verified bf16 peak for device kind {device_kind!r}; pass --peak_tflops"


def _encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of ``depth`` pre-LN blocks on ``tokens`` tokens: q, k, v, out
  projections ``8 n w²``, scores and attention × values ``4 n² w``, MLP ``4 n w m``."""
  n, w = tokens, width
  return depth * (8 * n * w * w + 4 * n * n * w + 4 * n * w * mlp_dim)


def analytic_flops(config, batch: int) -> dict:
  """Model FLOPs of one train step on a global ``batch`` (matmuls only, forward × 3).

  Image: patch embedding, the encoder on patches (+ the class token), the pooled
  projection; text: the encoder on ``context_length`` tokens (padding is computed too) and
  the pooled projection; loss: the ``[B, B]`` logits ``2 B² E``.
  """
  model, size = config.model, config.data.image_size
  img, txt, embed = model.image, model.text, model.embed_dim
  mlp = lambda t: t.get("mlp_dim") or int(t.get("mlp_ratio", 4.0) * t.width)
  patch = img.patch_size
  patches = (size // patch) ** 2
  tokens = patches + (1 if img.get("pool", "cls") == "cls" else 0)
  image = (2 * patches * patch * patch * 3 * img.width
           + _encoder_flops(tokens, img.width, img.depth, mlp(img)) + 2 * img.width * embed)
  length = config.tokenizer.context_length
  text = _encoder_flops(length, txt.width, txt.depth, mlp(txt)) + 2 * txt.width * embed
  loss = 2 * batch * batch * embed
  forward = batch * (image + text) + loss
  return {"image_forward_per_sample": image, "text_forward_per_sample": text,
          "loss_forward": loss, "forward": forward, "train_step": 3 * forward}


def mfu_report(flops_per_step: float, step_s: float, num_devices: int, device_kind: str,
               peak_tflops: Optional[float] = None) -> dict:
  """MFU = model FLOPs per step / (step time × devices × peak FLOP/s), None without a peak."""
  peak, source = peak_flops(device_kind, peak_tflops)
  achieved = flops_per_step / step_s / num_devices
  return {"achieved_tflops_per_device": achieved / 1e12,
          "peak_tflops_per_device": None if peak is None else peak / 1e12,
          "peak_source": source, "mfu": None if peak is None else achieved / peak,
          "flops_used": "analytic"}


def make_config(quick: bool, per_device_batch: int, num_devices: int, block_size: int):
  config = clip_config.clip("size=tiny" if quick else "size=b16,vocab=unused",
                            data={}, evaluators={})
  config.batch_size = per_device_batch * num_devices
  config.loss.block_size = block_size
  return config


def jit_step(config, objective, optimizer, mesh, shardings):
  """The jitted step :func:`train_state.make_step` builds for ``config`` (split objective,
  mode ``jit``), taking the global batch instead of a host-local numpy one (tested equal)."""
  train_state.make_step(config, objective, optimizer, mesh, shardings)  # its checks
  return jax.jit(functools.partial(train_state.sharded_train_step, objective=objective,
                                   optimizer=optimizer, mesh=mesh,
                                   accum_steps=config.parallel.accum_steps),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def compile_step(config, objective, optimizer, mesh, shardings, state, batch):
  """``(compiled step, seconds)``; ``state`` / ``batch`` may be abstract."""
  t0 = time.perf_counter()
  compiled = jit_step(config, objective, optimizer, mesh, shardings).lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def batch_spec(config, batch: int, mesh, image_dtype: str) -> dict:
  size, length = config.data.image_size, config.tokenizer.context_length
  sharding = parallel.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {"image": spec((batch, size, size, 3), jnp.dtype(image_dtype)),
          "text": spec((batch, length), jnp.int32), "text_mask": spec((batch, length), bool)}


def make_batch(spec: dict, vocab: int, seed: int = 0, pool: int = 1024) -> dict:
  """A synthetic batch made on the devices with ``spec``'s shardings: images from a pool of
  ``pool`` random ones (uint8 pixels, or floats in [-1, 1]), shifted by ``row // pool`` so
  rows differ (no random-bit temporaries the size of the batch); texts of 8 … L-1 random
  tokens ending with the end-of-text id ``vocab - 1``, zero-padded."""
  image, text = spec["image"], spec["text"]

  def generate(key):
    k_img, k_len, k_tok = jax.random.split(key, 3)
    b, length = text.shape
    p = min(b, pool)
    if image.dtype == jnp.uint8:
      base = jax.random.bits(k_img, (p,) + image.shape[1:], jnp.uint8)
    else:
      base = jax.random.uniform(k_img, (p,) + image.shape[1:], image.dtype, -1.0, 1.0)
    rows = jnp.arange(b)
    shift = (rows // p % 64)[:, None, None, None]
    pixels = base[rows % p] + (shift.astype(jnp.uint8) if image.dtype == jnp.uint8
                               else (shift / 640).astype(image.dtype))
    lengths = jax.random.randint(k_len, (b, 1), min(8, length - 1), length)
    pos = jnp.arange(length)[None]
    tokens = jax.random.randint(k_tok, (b, length), 1, vocab - 1)
    tokens = jnp.where(pos == lengths - 1, vocab - 1, jnp.where(pos < lengths, tokens, 0))
    return {"image": pixels, "text": tokens.astype(jnp.int32), "text_mask": pos < lengths}

  shardings = {k: v.sharding for k, v in spec.items()}
  return jax.jit(generate, out_shardings=shardings)(jax.random.PRNGKey(seed))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
  return dict(out, peak=getattr(m, "peak_memory_in_bytes", None))


def _cost_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _device_peak_bytes() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def loss_temp_bytes(batch: int, dim: int, block_size: int) -> int:
  """Compiled temp bytes of ``value_and_grad`` of the ring CLIP loss on one device."""
  fn = lambda x, y, s, axis: ring_clip_loss(x, y, s, block_size=block_size, axis_name=axis)
  return int(memory_profile.temp_bytes(fn, batch, dim, 1))


def search(batches: Sequence[int], attempt: Callable[[int], dict], *, deadline: float,
           clock: Callable[[], float] = time.perf_counter) -> list:
  """Tries ``attempt(batch) -> row`` in order; stops at the first exception or row whose
  ``status`` is not ``'trained'``. A batch whose estimated time (the previous row's
  ``step_s`` scaled by the batch ratio, plus its ``setup_s``) would pass ``deadline`` is
  reported as ``'not tried: time budget'``."""
  rows, last = [], None
  for i, batch in enumerate(batches):
    if last is not None:
      estimate = last["step_s"] * batch / last["batch"] + last["setup_s"]
      if clock() + estimate > deadline:
        rows.append({"batch": batch, "status": "not tried: time budget",
                     "estimated_s": round(estimate, 1)})
        continue
    try:
      row = attempt(batch)
    except Exception as e:  # noqa: BLE001 -- an OOM / compile error ends the search cleanly
      msg = f"{type(e).__name__}: {e}"
      oom = any(m in msg for m in OOM_MARKERS)
      row = {"batch": batch, "status": "failed: " + ("out of memory" if oom else "error"),
             "error": msg[:400]}
      gc.collect()
    rows.append(row)
    if row["status"] != "trained":
      rows += [{"batch": b, "status": "not tried: stopped after a failure"}
               for b in batches[i + 1:]]
      break
    last = row
  return rows


def batch_schedule(first: int, cap: int, factor: int) -> list:
  """``first, first·factor, …`` up to ``cap``, and ``cap`` itself when it is a multiple of
  ``first`` not reached exactly."""
  out = [first]
  while out[-1] * factor <= cap:
    out.append(out[-1] * factor)
  if out[-1] < cap and cap % first == 0:
    out.append(cap)
  return out


def _setup(config, mesh, image_dtype: str):
  """``(objective, optimizer, state shardings, abstract state, initial state)``."""
  tokenizer = types.SimpleNamespace(vocab_size=VOCAB[config.tokenizer.name],
                                    context_length=config.tokenizer.context_length)
  objective = make_objective(config, tokenizer)
  optimizer = optim.make_optimizer(config.optimizer, config.total_steps)
  sample = {k: np.zeros((mesh.size,) + v.shape[1:], v.dtype)  # shapes for init
            for k, v in batch_spec(config, mesh.size, mesh, image_dtype).items()}
  create = functools.partial(train_state.create, objective, optimizer, seed=0)
  abstract = jax.eval_shape(create, sample)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0), sample)[0]
  shardings = partitioning.state_shardings(
      abstract, partitioning.param_shardings(boxed, mesh), optimizer, mesh)
  spec = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)
  state = jax.jit(create, out_shardings=shardings)(sample)
  return objective, optimizer, shardings, spec, state


def run(quick: bool = False, *, per_device_batch: Optional[int] = None,
        steps: Optional[int] = None, max_seconds: float = 480.0,
        peak_tflops: Optional[float] = None, max_batch: Optional[int] = None,
        factor: Optional[int] = None, batches: Optional[Sequence[int]] = None,
        block_size: Optional[int] = None, image_dtype: str = "uint8",
        num_devices: Optional[int] = None) -> dict:
  """Both measurements; returns a JSON-serialisable dict (see the module docstring).

  Full mode: ViT-B/16 bfloat16, per-device batch 256, 20 timed steps after 3 warm-up ones,
  batches ×4 per try up to 2 × 262,144 (``factor=2`` doubles). Quick mode: the ``tiny`` CLIP
  in float32, per-device batch 8, 3 timed steps, batches ×2 up to max(64, 4 × the first).
  ``batches`` overrides the schedule (its first, the MFU batch, reuses the MFU step);
  ``block_size``: the ring loss's row block (default: min(per-device batch, 256); the live
  logits are ``block × B`` floats, 256 MiB at B = 262,144).
  """
  t_start = time.perf_counter()
  devices = jax.local_devices()[:num_devices]
  n, kind = len(devices), devices[0].device_kind
  per_device_batch = per_device_batch or (8 if quick else 256)
  steps, warmup = steps or (3 if quick else 20), 1 if quick else 3
  block_size = block_size or min(per_device_batch, 256)
  config = make_config(quick, per_device_batch, n, block_size)
  vocab, embed = VOCAB[config.tokenizer.name], config.model.embed_dim
  mesh = parallel.make_mesh(-1, devices)
  objective, optimizer, shardings, state_spec, state = _setup(config, mesh, image_dtype)
  first = per_device_batch * n

  # 1. MFU at the first batch (accum_steps 1).
  spec = batch_spec(config, first, mesh, image_dtype)
  mfu_step, mfu_compile_s = compile_step(config, objective, optimizer, mesh, shardings,
                                         state_spec, spec)
  batch, times = make_batch(spec, vocab), []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = mfu_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  del batch
  step_s = statistics.median(times[warmup:])
  flops, cost = analytic_flops(config, first), _cost_flops(mfu_step)
  per_device = flops["train_step"] / n
  mfu = dict(batch=first, per_device_batch=per_device_batch, dtype=config.model.dtype,
             compile_s=round(mfu_compile_s, 2), step_ms=1e3 * step_s, steps_per_s=1 / step_s,
             images_per_s=first / step_s, steps_timed=steps, loss=float(metrics["loss"]),
             analytic_flops_per_step=flops["train_step"], analytic_flops_per_device=per_device,
             analytic=flops, cost_analysis_flops_per_device=cost,
             cost_over_analytic=None if cost is None else cost / per_device,
             **mfu_report(flops["train_step"], step_s, n, kind, peak_tflops))

  # 2. Largest batch with GradCache (micro-batch = the per-device batch).
  def attempt(b: int) -> dict:
    nonlocal state
    t0 = time.perf_counter()
    if b % first:
      raise ValueError(f"batch {b} is not a multiple of {first} (devices × per-device batch)")
    row = {"batch": b, "accum_steps": b // first,
           "loss_temp_bytes": loss_temp_bytes(b, embed, block_size),
           "embedding_bytes": b * embed * 4}  # one [B, E] float32 array
    if b == first:  # the MFU step's own row
      return dict(row, status="trained", compile_s=mfu["compile_s"], step_s=step_s,
                  images_per_s=first / step_s, loss=mfu["loss"], memory=_memory(mfu_step),
                  setup_s=mfu_compile_s + time.perf_counter() - t0,
                  device_peak_bytes=_device_peak_bytes())
    cfg = config.copy_and_resolve_references()
    cfg.batch_size, cfg.parallel.accum_steps = b, b // first
    spec = batch_spec(cfg, b, mesh, image_dtype)
    compiled, seconds = compile_step(cfg, objective, optimizer, mesh, shardings,
                                     state_spec, spec)
    batch = jax.block_until_ready(make_batch(spec, vocab, seed=b // first))
    t1 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds_step = time.perf_counter() - t1
    del batch
    loss = float(metrics["loss"])
    return dict(row, status="trained" if math.isfinite(loss) else "failed: non-finite loss",
                compile_s=round(seconds, 2), step_s=seconds_step,
                images_per_s=b / seconds_step, loss=loss, memory=_memory(compiled),
                setup_s=time.perf_counter() - t0 - seconds_step,
                device_peak_bytes=_device_peak_bytes())

  if batches is None:
    cap = max_batch or (max(64, 4 * first) if quick else 2 * GOAL_BATCH)
    batches = batch_schedule(first, cap, factor or (2 if quick else 4))
  rows = search(list(batches), attempt, deadline=t_start + max_seconds)
  trained = [r for r in rows if r["status"] == "trained"]
  best = trained[-1] if trained else {}
  compiles = [r["compile_s"] for r in trained if r["accum_steps"] > 1]
  params = sum(x.size for x in jax.tree.leaves(state_spec.params))
  return {
      "device": kind, "platform": devices[0].platform, "devices": n, "jax": jax.__version__,
      "quick": quick, "image_dtype": image_dtype, "block_size": block_size,
      "model": {"size": "tiny" if quick else "b16", "parameters": int(params),
                "dtype": config.model.dtype, "image_size": config.data.image_size,
                "context_length": config.tokenizer.context_length, "embed_dim": embed},
      "mfu": mfu,
      "largest_batch": {
          "rows": rows, "largest": best.get("batch"), "step_s": best.get("step_s"),
          "loss_temp_bytes": best.get("loss_temp_bytes"),
          "goal_batch": GOAL_BATCH, "goal_loss_bytes": GOAL_LOSS_BYTES,
          "batch_goal_met": best.get("batch", 0) >= GOAL_BATCH,
          "loss_goal_met": bool(best) and best["loss_temp_bytes"] < GOAL_LOSS_BYTES,
          "compile_s_accum": [min(compiles), max(compiles)] if compiles else None},
      "elapsed_s": round(time.perf_counter() - t_start, 1)}


def _fmt(x, scale=1.0, digits=1):
  return "-" if x is None else f"{x / scale:,.{digits}f}"


def table(result: dict) -> str:
  """The printed report: MFU lines and the batch table (markdown)."""
  m, lb, mib = result["mfu"], result["largest_batch"], 2**20
  mfu = f"None ({m['peak_source']})" if m["mfu"] is None else f"{100 * m['mfu']:.1f} %"
  yes = lambda ok: "met" if ok else "not met"
  lines = [
      f"{result['device']} × {result['devices']} ({result['platform']}), jax {result['jax']}; "
      f"CLIP {result['model']['size']} ({result['model']['parameters']:,} parameters, "
      f"{result['model']['dtype']}), images fed as {result['image_dtype']}",
      f"MFU step: batch {m['batch']} ({m['per_device_batch']} per device), compile "
      f"{m['compile_s']} s, median {m['step_ms']:.2f} ms over {m['steps_timed']} steps, "
      f"{m['steps_per_s']:.2f} steps/s, {m['images_per_s']:,.0f} images/s",
      f"FLOPs/step: analytic {m['analytic_flops_per_step']:.4g} "
      f"({m['analytic_flops_per_device']:.4g} per device), cost_analysis "
      f"{_fmt(m['cost_analysis_flops_per_device'], 1, 0)} per device (ratio "
      f"{_fmt(m['cost_over_analytic'], 1, 3)}); achieved "
      f"{m['achieved_tflops_per_device']:.2f} TFLOP/s per device",
      f"MFU (analytic FLOPs, peak {_fmt(m['peak_tflops_per_device'], 1, 1)} TFLOP/s): {mfu}",
      "", "| global batch | accum | status | compile s | step s | images/s | temp MiB | "
      "argument MiB | output MiB | device peak MiB | loss temp MiB (1 device) | loss |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in lb["rows"]:
    mem = r.get("memory", {})
    cells = [f"{r['batch']:,}", r.get("accum_steps", "-"), r["status"], r.get("compile_s", "-"),
             _fmt(r.get("step_s"), 1, 3), _fmt(r.get("images_per_s"), 1, 0)]
    cells += [_fmt(v, mib) for v in (mem.get("temp"), mem.get("argument"), mem.get("output"),
                                     r.get("device_peak_bytes"), r.get("loss_temp_bytes"))]
    lines.append("| " + " | ".join(map(str, cells + [_fmt(r.get("loss"), 1, 4)])) + " |")
  lines += [f"batch {r['batch']:,}: {r['error']}" for r in lb["rows"] if "error" in r]
  lines.append(
      f"Largest batch that trained: {_fmt(lb['largest'], 1, 0)} (goal ≥ {lb['goal_batch']:,}: "
      f"{yes(lb['batch_goal_met'])}), step {_fmt(lb['step_s'], 1, 2)} s, loss temp "
      f"{_fmt(lb['loss_temp_bytes'], mib)} MiB on one device (goal < 1 GB: "
      f"{yes(lb['loss_goal_met'])}); compile s over accum > 1: {lb['compile_s_accum']}; "
      f"total {result['elapsed_s']} s")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, seconds on a CPU")
  parser.add_argument("--output", default=None, help="write the result as JSON")
  parser.add_argument("--max_seconds", type=float, default=480.0)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="bf16 peak TFLOP/s per device (overrides the table)")
  parser.add_argument("--per_device_batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="timed MFU steps")
  parser.add_argument("--max_batch", type=int, default=None)
  parser.add_argument("--factor", type=int, default=None, help="batch growth per try")
  parser.add_argument("--batches", default="", help="comma-separated global batches")
  parser.add_argument("--block_size", type=int, default=None)
  parser.add_argument("--image_dtype", default="uint8",
                      choices=("uint8", "bfloat16", "float32"))
  parser.add_argument("--devices", type=int, default=None, help="local devices used")
  parser.add_argument("--cpu_devices", default="",
                      help="--cpu_devices=N: N simulated CPU devices (CLI only, before JAX)")
  args = parser.parse_args(argv)
  result = run(args.quick, per_device_batch=args.per_device_batch, steps=args.steps,
               max_seconds=args.max_seconds, peak_tflops=args.peak_tflops,
               max_batch=args.max_batch, factor=args.factor,
               batches=[int(b) for b in args.batches.split(",") if b] or None,
               block_size=args.block_size, image_dtype=args.image_dtype,
               num_devices=args.devices)
  print(table(result))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
