"""Renders ``benchmarks/run.py``'s results: RESULTS.md, PNG plots and results/run.json."""

from __future__ import annotations

import datetime
import json
import os
import platform

MIB = 2**20


def _mib(n) -> str:
  return f"{n / MIB:,.2f}"


def _mark(ok) -> str:
  return "yes" if ok else "**no**"


def _status(result) -> str | None:
  """A line for a part that has no numbers (skipped or failed), else None."""
  if "skipped" in result:
    return f"Skipped: {result['skipped']}"
  if "error" in result:
    return "Failed:\n\n```\n" + result["error"].strip()[-1500:] + "\n```"
  return None


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_loss_memory(result: dict, path_batch: str, path_devices: str) -> None:
  plt = _plt()
  for key, path, xlabel in (("batch", path_batch, "global batch"),
                            ("devices", path_devices, "devices (fixed global batch)")):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, entry) in enumerate(result[key].items()):
      xs = [r[0] for r in entry["rows"]]
      color = f"C{i}"
      ax.plot(xs, [r[1] / MIB for r in entry["rows"]], "--o", color=color, alpha=0.6,
              label=f"{name} global view")
      ax.plot(xs, [r[2] / MIB for r in entry["rows"]], "-s", color=color,
              label=f"{name} lean (slope {entry['slope_lean']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("per-device temp memory of value_and_grad (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(path: str, title: str, labels, values, ylabel: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
  ax.bar_label(bars, fmt="%.1f")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _loss_memory(r: dict, plots: dict) -> list:
  s = r["settings"]
  lines = [f"Compiled per-device temporary memory of `value_and_grad` of each loss "
           f"(`benchmarks/loss_memory.py`), D = {s['dim']}, {s['devices']} simulated devices "
           f"for the batch table, block {s['block_size']} (token losses: "
           f"{s['image_tokens']} image / {s['text_tokens']} text tokens, block "
           f"{s['filip_block_size']}). Reference = the global-view loss; lean = the ring form "
           f"the objectives train with.", "",
           "| loss | global batches | reference MiB | lean MiB | slope reference | slope lean "
           "| goal ≤ 1.05 |", "|---|---|---|---|---|---|---|"]
  for name, e in r["batch"].items():
    rows = e["rows"]
    lines.append(f"| {name} | {' / '.join(str(x[0]) for x in rows)} | "
                 f"{' / '.join(_mib(x[1]) for x in rows)} | "
                 f"{' / '.join(_mib(x[2]) for x in rows)} | {e['slope_reference']:.2f} | "
                 f"{e['slope_lean']:.2f} | {_mark(e['met'])} |")
  lines += ["", f"![loss memory vs batch]({plots['batch']})", "",
            "| loss | global batch | devices | reference MiB | lean MiB | slope reference "
            "| slope lean | lean, W ≥ 2 | goal ≤ −0.9 |", "|---|---|---|---|---|---|---|---|---|"]
  for name, e in r["devices"].items():
    rows, multi = e["rows"], e.get("slope_lean_multi_device")
    lines.append(f"| {name} | {e['global_batch']} | {' / '.join(str(x[0]) for x in rows)} | "
                 f"{' / '.join(_mib(x[1]) for x in rows)} | "
                 f"{' / '.join(_mib(x[2]) for x in rows)} | {e['slope_reference']:.2f} | "
                 f"{e['slope_lean']:.2f} | {'—' if multi is None else f'{multi:.2f}'} | "
                 f"{_mark(e['met'])} |")
  lines += ["", "On one device the ring sends nothing, so it holds no visiting shard or "
            "gradient in flight; from two devices on it holds a few `[b, D]` buffers "
            "(b = B / W), which is what the slope over W ≥ 2 measures."]
  lines += ["", f"![loss memory vs devices]({plots['devices']})"]
  return lines


def _step_overhead(r: dict, plots: dict) -> list:
  return [f"CLIP (ViT width {r['width']}, {r['params']:,} parameters, {r['image_size']} px, "
          f"{r['context_length']} tokens), global batch {r['global_batch']} on {r['devices']} "
          f"simulated {r['platform']} devices (`benchmarks/step_overhead.py`). Full step = the "
          f"trainer's step (ring loss, gradients, AdamW, metrics); encoders = forward + "
          f"backward of the two towers with the loss replaced by a sum. Best of "
          f"{r['rounds']} interleaved rounds of {r['steps_per_round']} steps each.", "",
          "| full step ms | encoders ms | ratio | per-round ratios | goal ≤ 1.05 |",
          "|---|---|---|---|---|",
          f"| {r['full_step_ms']:.1f} | {r['encoders_step_ms']:.1f} | {r['ratio']:.3f} | "
          f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {_mark(r['met'])} |", "",
          f"![step overhead]({plots['step_overhead']})"]


def _default_run(r: dict, plots: dict) -> list:
  del plots
  return [f"`python -m contrastive_jax.train --config {r['config']},steps={r['steps']},eval=0` "
          f"on this machine's own devices (`benchmarks/default_run.py`); compile = the first "
          f"step (`first_step_s` in `metrics.jsonl`) minus one steady step.", "",
          "| first step s | compile s | steady steps/s | reports | goal compile < 30 s |",
          "|---|---|---|---|---|",
          f"| {r['first_step_s']:.2f} | {r['compile_s']:.2f} | {r['steps_per_s']:.2f} | "
          f"{', '.join(str(x) for x in r['steps_per_s_reports'])} | {_mark(r['met'])} |"]


def _input_pipeline(r: dict, plots: dict) -> list:
  del plots
  d, w = r["decode"], r["input_wait"]
  rows = {row["threads"]: row for row in d["rows"]}
  return [f"`benchmarks/input_pipeline.py` on {d['cpu']} ({d['cores']} cores, TF "
          f"{d['tensorflow']}): decode + random resized crop to {d['size']} px + flip + "
          f"normalisation of synthetic 500×375 JPEGs ({d['mean_jpeg_kb']} KB) in memory; input "
          f"wait = time blocked on `next(batch)` over step time in a training run of "
          f"{w['config']} ({w['image_size']} px, batch {w['batch']}, {w['devices']} devices).",
          "", "| images/s, 1 core | images/s, all cores | goal ≥ 1000 / core | step ms "
          "| input wait | pipeline alone images/s | goal wait ≤ 5 % |",
          "|---|---|---|---|---|---|---|",
          f"| {rows[1]['images_per_s']:,.0f} | {rows[max(rows)]['images_per_s']:,.0f} | "
          f"{_mark(r['images_per_s_per_core'] >= r['goal_images_per_s_per_core'])} | "
          f"{w['step_ms']:.0f} | {100 * w['wait_fraction']:.2f} % | "
          f"{w['pipeline_alone_images_per_s']:,.0f} | "
          f"{_mark(r['wait_fraction'] <= r['goal_wait_fraction'])} |"]


def _open_clip(r: dict, plots: dict) -> list:
  lines = [f"The same tiny ViT CLIP in both libraries (`benchmarks/open_clip_compare.py`), "
           f"float32, {r.get('threads')} thread(s) each, steady-state train step (AdamW, CLIP "
           f"loss).", "", "| ours ms | open_clip ms | ratio | parameters (ours / open_clip) "
           "| goal ≤ 0.8 |", "|---|---|---|---|---|",
           f"| {r['step_ms_ours']:.1f} | {r['step_ms_open_clip']:.1f} | {r['ratio']:.3f} | "
           f"{r.get('params_ours', 0):,} / {r.get('params_open_clip', 0):,} | "
           f"{_mark(r['met'])} |"]
  j = r.get("jemalloc")
  if j and "ratio" in j:
    lines.append(f"| {j['step_ms_ours']:.1f} | {j['step_ms_open_clip']:.1f} | "
                 f"{j['ratio']:.3f} | both with jemalloc (`LD_PRELOAD`, no purging) | "
                 f"{_mark(j['met'])} |")
  lines += ["", f"Kernel time per step (page faults of fresh temporaries): ours "
            f"{r['sys_ms']['ours']:.0f} ms, open_clip {r['sys_ms']['open_clip']:.0f} ms."]
  if "config" in r:
    lines += ["", "Configuration: `" + json.dumps(r["config"]) + "`"]
  if "open_clip" in plots:
    lines += ["", f"![ours vs open_clip]({plots['open_clip']})"]
  return lines


def _gpu(r: dict, plots: dict) -> list:
  del plots
  import gpu_scale
  return ["`benchmarks/gpu_scale.py`: the trainer's step of CLIP (ViT-B/16, bfloat16, per-device "
          "batch 256 on an accelerator; a tiny model on CPU in `--quick`), FLOPs counted per "
          "matmul (MFU) and checked against XLA's cost analysis; then the global batch grows "
          "with GradCache micro-batches and the ring loss until a step fails or the time "
          "budget ends.", "", gpu_scale.table(r)]


def _generic(r: dict, plots: dict) -> list:
  del plots
  shown = {k: v for k, v in r.items() if k != "seconds"}
  return ["```json", json.dumps(shown, indent=2)[:6000], "```"]


RENDER = {"loss_memory": _loss_memory, "step_overhead": _step_overhead,
          "default_run": _default_run, "input_pipeline": _input_pipeline,
          "open_clip": _open_clip, "gpu": _gpu}


def goals(results: dict) -> list:
  """``(measure, goal, result, met)`` rows of the summary table (met: True/False/None)."""
  rows = []
  r = results.get("loss_memory")
  if r and not _status(r):
    worst = max(r["batch"].items(), key=lambda kv: kv[1]["slope_lean"])
    rows.append(("loss memory vs global batch, lean slope (worst loss)", "≤ 1.05",
                 f"{worst[1]['slope_lean']:.2f} ({worst[0]})",
                 all(e["met"] for e in r["batch"].values())))
    worst = max(r["devices"].items(), key=lambda kv: kv[1]["slope_lean"])
    rows.append(("loss memory vs devices, lean slope (worst loss)", "≤ −0.9",
                 f"{worst[1]['slope_lean']:.2f} ({worst[0]})",
                 all(e["met"] for e in r["devices"].values())))
  r = results.get("step_overhead")
  if r and not _status(r):
    rows.append(("full step ÷ encoders fwd+bwd", "≤ 1.05", f"{r['ratio']:.3f}", r["met"]))
  r = results.get("default_run")
  if r and not _status(r):
    rows.append(("compile time of the default train step (CPU)", "< 30 s",
                 f"{r['compile_s']:.1f} s ({r['steps_per_s']:.1f} steps/s)", r["met"]))
  r = results.get("input_pipeline")
  if r and not _status(r):
    rows.append(("input pipeline, images/s per core", "≥ 1000",
                 f"{r['images_per_s_per_core']:,.0f}",
                 r["images_per_s_per_core"] >= r["goal_images_per_s_per_core"]))
    rows.append(("input wait fraction of a training run", "≤ 5 %",
                 f"{100 * r['wait_fraction']:.2f} %",
                 r["wait_fraction"] <= r["goal_wait_fraction"]))
  r = results.get("open_clip")
  if r and not _status(r):
    rows.append(("train step ours ÷ open_clip (1 thread each)", "≤ 0.8",
                 f"{r['ratio']:.3f}", r["met"]))
    j = r.get("jemalloc")
    if j and "ratio" in j:
      rows.append(("the same, both with jemalloc", "≤ 0.8", f"{j['ratio']:.3f}", j["met"]))
  r = results.get("gpu")
  if r and not _status(r):
    m, lb = r["mfu"], r["largest_batch"]
    rows.append((f"MFU, CLIP {r['model']['size']} {r['model']['dtype']} on {r['device']}",
                 "≥ 50 %", "n/a: " + m["peak_source"] if m["mfu"] is None
                 else f"{100 * m['mfu']:.1f} %", None if m["mfu"] is None else m["mfu"] >= 0.5))
    rows.append(("largest global batch that trains on one device (ring loss + GradCache)",
                 "≥ 262,144", f"{lb['largest'] or 0:,}", lb["batch_goal_met"]))
    if lb["loss_temp_bytes"] is not None:
      rows.append(("loss memory at that batch (value_and_grad temp, one device)", "< 1 GB",
                   f"{_mib(lb['loss_temp_bytes'])} MiB", lb["loss_goal_met"]))
  for name, r in results.items():
    line = _status(r)
    if line:
      rows.append((PARTS_TITLE.get(name, name), "", line.split("\n")[0][:120], None))
  return rows


PARTS_TITLE = {"loss_memory": "loss memory", "step_overhead": "step overhead",
               "default_run": "default run", "input_pipeline": "input pipeline",
               "open_clip": "open_clip side by side", "gpu": "accelerator part"}


def write(results: dict, output_dir: str, *, quick: bool) -> str:
  """Writes ``RESULTS.md``, ``plots/*.png`` and ``results/run.json`` under ``output_dir``."""
  os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
  os.makedirs(os.path.join(output_dir, "results"), exist_ok=True)
  with open(os.path.join(output_dir, "results", "run.json"), "w") as f:
    json.dump(results, f, indent=2)
  plots = {}
  r = results.get("loss_memory")
  if r and not _status(r):
    plots["batch"] = "plots/loss_memory_batch.png"
    plots["devices"] = "plots/loss_memory_devices.png"
    plot_loss_memory(r, *(os.path.join(output_dir, plots[k]) for k in ("batch", "devices")))
  r = results.get("step_overhead")
  if r and not _status(r):
    plots["step_overhead"] = "plots/step_overhead.png"
    plot_bars(os.path.join(output_dir, plots["step_overhead"]),
              f"CLIP step on {r['devices']} devices, ratio {r['ratio']:.2f}",
              ["full step", "encoders fwd+bwd"], [r["full_step_ms"], r["encoders_step_ms"]],
              "ms per step")
  r = results.get("open_clip")
  if r and not _status(r):
    plots["open_clip"] = "plots/open_clip.png"
    plot_bars(os.path.join(output_dir, plots["open_clip"]),
              f"train step, ratio {r['ratio']:.2f}", ["contrastive_jax", "open_clip"],
              [r["step_ms_ours"], r["step_ms_open_clip"]], "ms per step")

  import jax  # versions only; the parent never runs a computation
  today = datetime.date.today().isoformat()
  lines = ["# Benchmark results", "",
           f"`python benchmarks/run.py{' --quick' if quick else ''}` on {today}: "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
           f"{platform.python_version()}, jax {jax.__version__}. Ratios are measured within one "
           f"run; memory is the compiled programs' own analysis. Every number is in "
           f"`results/run.json`.", "",
           "## Goals", "", "| measure | goal | result | met |", "|---|---|---|---|"]
  for measure, goal, value, met in goals(results):
    lines.append(f"| {measure} | {goal} | {value} | "
                 f"{'—' if met is None else _mark(met)} |")
  for name, r in results.items():
    lines += ["", f"## {PARTS_TITLE.get(name, name).capitalize()}", ""]
    status = _status(r)
    lines += [status] if status else RENDER.get(name, _generic)(r, plots)
    lines += ["", f"({r.get('seconds', 0):.0f} s)"]
  path = os.path.join(output_dir, "RESULTS.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
