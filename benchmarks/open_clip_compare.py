"""Train-step time side by side with open_clip: the same tiny ViT CLIP, float32, same threads.

Both sides train one configuration (image size, patch, vision width / depth / heads / MLP
ratio, text context / vocabulary / width / depth / heads, embedding size, batch) with CLIP's
loss and AdamW (same hyperparameters, warm-up + cosine learning rate, gradient clipping at
norm 1, logit scale clamped to ``[0, log 100]`` after each update, no weight decay on 1-D
parameters) on the same synthetic batch:

* ours: :class:`contrastive_jax.models.TwoTower` through the library's compiled train step
  (``train_state.make_step``, as ``contrastive_jax.train`` runs it) on one CPU device;
* open_clip: ``open_clip.model.CLIP`` + ``open_clip.loss.ClipLoss`` + ``torch.optim.AdamW``
  in eager mode, the step of open_clip's training loop.

Matched choices: pre-LN blocks, a class token pooled after the final LayerNorm (open_clip
``pool_type='tok'``), ``ln_pre`` on the image tokens, LayerNorm epsilon 1e-5, exact GELU
(torch ``nn.GELU``; ``activation='quick_gelu'`` switches both to QuickGELU), text pooled at
the end-of-text token (the largest id, open_clip's ``argmax``), bias-free projections.
Parameter counts agree exactly: our patch embedding has a bias (``width``) and our position
embeddings skip the class token (``-width``).

Each side runs in its own fresh process (JAX with one CPU device and clean ``XLA_FLAGS``, even
when the caller imported JAX with simulated devices), pinned to the same ``threads`` CPUs.
Thread limits: both processes get ``sched_setaffinity`` to the first ``threads`` CPUs before
importing anything heavy, and ``OMP_NUM_THREADS=threads``; torch also
``set_num_threads(threads)`` / ``set_num_interop_threads(1)``. XLA:CPU sizes its intra-op
thread pool from the schedulable CPUs (``tsl::port::MaxParallelism``, i.e. the affinity mask);
the installed jaxlib has no thread-count flag, so the affinity is the limit, and with
``threads=1`` we also pass ``--xla_cpu_multi_thread_eigen=false``. Each worker reports its
affinity, OS threads and CPU-time / wall-time over the timed rounds as evidence.

Allocation: XLA:CPU allocates each execution's temporary buffer afresh (270 MB for the default
step); glibc serves it with a new ``mmap``, so every step page-faults it in (~70k minor faults,
a third of the single-thread step in the kernel). ``--env`` runs both workers with another
allocator setting, e.g. ``--env GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` or jemalloc with
purging off (``--env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --env
MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``); each worker reports its page faults.

Both workers compile and warm up first; then timed rounds of ``steps`` steps alternate between
them (one is idle while the other runs), so a load change on a shared machine hits both; the
step time is the median over rounds.

  python benchmarks/open_clip_compare.py [--quick] [--threads N] [--output F.json]

Needs the optional ``torch`` and ``open_clip_torch`` (``pip install -e '.[import-test]'``);
without them ``run`` returns ``{"skipped": ...}`` and the CLI prints it and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

GOAL = 0.8  # ours / open_clip step time
PIP = ("pip install torch --index-url https://download.pytorch.org/whl/cpu && "
       "pip install open_clip_torch   (or: pip install -e '.[import-test]')")
MARKER = "@@open_clip_compare@@ "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shapes config's `cpu` size (configs/clip_shapes.py) and its `tiny` size for --quick.
CONFIGS = {
    "default": dict(image_size=48, patch_size=8, vision_width=64, vision_depth=3,
                    vision_heads=4, mlp_ratio=4.0, context_length=48, vocab_size=258,
                    text_width=64, text_depth=2, text_heads=4, embed_dim=64, batch=128,
                    activation="gelu_exact"),
    "quick": dict(image_size=32, patch_size=8, vision_width=32, vision_depth=1,
                  vision_heads=4, mlp_ratio=4.0, context_length=16, vocab_size=258,
                  text_width=32, text_depth=1, text_heads=4, embed_dim=32, batch=16,
                  activation="gelu_exact"),
}
OPTIMIZER = dict(learning_rate=5e-4, warmup_steps=10, total_steps=10_000, end_factor=0.0,
                 b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 logit_scale_max=math.log(100.0))
LAYER_NORM_EPSILON = 1e-5  # torch's default, used by open_clip
ACTIVATIONS = ("gelu_exact", "quick_gelu")


def _import(name: str) -> None:
  """Imports ``name`` in a fresh process (torch must not load into the caller, which may hold
  TensorFlow: the two crash together); raises ImportError with the child's last error line."""
  if importlib.util.find_spec(name) is None:
    raise ModuleNotFoundError(f"No module named '{name}'")
  proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                        text=True, env=_clean_env(1), check=False)
  if proc.returncode:
    lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
    raise ImportError(lines[-1])


def missing_dependency() -> Optional[str]:
  """None when torch and open_clip import; else a message naming the failed import."""
  for name in ("torch", "open_clip"):
    try:
      _import(name)
    except ImportError as e:
      return (f"open_clip comparison skipped: `import {name}` failed ({type(e).__name__}: "
              f"{e}). Install the optional extra: {PIP}")
  return None


def synthetic_batch(cfg: dict, seed: int = 0) -> dict:
  """NHWC float32 images in [-1, 1], int32 tokens ending in an end-of-text token (the largest
  id, ``vocab_size - 1``) followed by zeros, and the bool mask of real tokens."""
  rng = np.random.default_rng(seed)
  b, size, length, vocab = cfg["batch"], cfg["image_size"], cfg["context_length"], \
      cfg["vocab_size"]
  lengths = rng.integers(min(8, length), length + 1, b)
  mask = np.arange(length)[None] < lengths[:, None]
  text = np.where(mask, rng.integers(1, vocab - 1, (b, length)), 0)
  text[np.arange(b), lengths - 1] = vocab - 1
  return {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
          "text": text.astype(np.int32), "text_mask": mask}


def learning_rate(step: int, opt: dict = OPTIMIZER) -> float:
  """Linear warm-up then cosine decay (``optim.learning_rate_schedule``'s formula)."""
  peak, warmup, total = opt["learning_rate"], opt["warmup_steps"], opt["total_steps"]
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / max(total - warmup, 1)
  end = peak * opt["end_factor"]
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------
# Workers (run in fresh processes by `run`).


def _limit_threads(threads: int) -> None:
  """Pins this process to the first ``threads`` CPUs it may use (before jax / torch load)."""
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)


def _ours(cfg: dict, threads: int):
  """Our compiled step on one CPU device: ``(step() -> loss, sync(loss) -> float, info)``."""
  import functools
  import types

  import jax

  from contrastive_jax import optim, parallel, partitioning, shapes_config, train_state
  from contrastive_jax.objectives import make_objective

  if jax.device_count() != 1:
    raise RuntimeError(f"expected one CPU device, got {jax.devices()}")
  config = shapes_config.image_text("size=cpu,eval=0", objective="clip")
  common = dict(mlp_ratio=cfg["mlp_ratio"], activation=cfg["activation"],
                layer_norm_epsilon=LAYER_NORM_EPSILON)
  config.model.embed_dim = cfg["embed_dim"]
  config.model.image = dict(patch_size=cfg["patch_size"], width=cfg["vision_width"],
                            depth=cfg["vision_depth"], num_heads=cfg["vision_heads"],
                            pool="cls", ln_pre=True, **common)
  config.model.text = dict(width=cfg["text_width"], depth=cfg["text_depth"],
                           num_heads=cfg["text_heads"], **common)
  config.data.image_size = cfg["image_size"]
  config.tokenizer.context_length = cfg["context_length"]
  config.batch_size = cfg["batch"]
  config.total_steps = OPTIMIZER["total_steps"]
  for key in ("learning_rate", "warmup_steps", "end_factor", "b1", "b2", "eps",
              "weight_decay", "grad_clip_norm", "logit_scale_max"):
    config.optimizer[key] = OPTIMIZER[key]
  config.parallel.data_axis_size = 1
  tokenizer = types.SimpleNamespace(vocab_size=cfg["vocab_size"],
                                    context_length=cfg["context_length"])
  objective = make_objective(config, tokenizer)
  optimizer = optim.make_optimizer(config.optimizer, config.total_steps,
                                   config.optimizer.logit_scale_max)
  mesh = parallel.make_mesh(1)
  batch = synthetic_batch(cfg)
  sample = jax.tree.map(lambda x: np.zeros_like(x[:1]), batch)
  create = functools.partial(train_state.create, objective, optimizer, seed=0)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0), sample)[0]
  shardings = partitioning.state_shardings(
      jax.eval_shape(create, sample), partitioning.param_shardings(boxed, mesh), optimizer,
      mesh)
  holder = {"state": jax.jit(create, out_shardings=shardings)(sample)}
  run_step = train_state.make_step(config, objective, optimizer, mesh, shardings)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))

  def step():
    holder["state"], metrics = run_step(holder["state"], batch)
    return metrics["loss"]

  def sync(loss):
    return float(jax.block_until_ready(loss))

  return step, sync, {"params": params, "jax": jax.__version__}


def open_clip_models(cfg: dict):
  """``(model, loss_fn)``: open_clip's CLIP and ClipLoss for ``cfg``."""
  import open_clip

  vision_cfg = dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                    width=cfg["vision_width"], layers=cfg["vision_depth"],
                    head_width=cfg["vision_width"] // cfg["vision_heads"],
                    mlp_ratio=cfg["mlp_ratio"], pool_type="tok", no_ln_pre=False,
                    final_ln_after_pool=False)
  text_cfg = dict(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                  width=cfg["text_width"], heads=cfg["text_heads"], layers=cfg["text_depth"],
                  mlp_ratio=cfg["mlp_ratio"], pool_type="argmax", proj_bias=False,
                  final_ln_after_pool=False)
  model = open_clip.model.CLIP(cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg,
                               quick_gelu=cfg["activation"] == "quick_gelu")
  return model, open_clip.loss.ClipLoss()


def _open_clip(cfg: dict, threads: int):
  """open_clip's eager train step (its training loop's order): ``(step, sync, info)``."""
  import open_clip
  import torch

  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  torch.manual_seed(0)
  model, loss_fn = open_clip_models(cfg)
  model.train()
  # open_clip's main.py: no weight decay on gains, biases, logit scale (1-D parameters).
  exclude = lambda n, p: (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                          or "logit_scale" in n)
  named = list(model.named_parameters())
  groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)],
             "weight_decay": OPTIMIZER["weight_decay"]}]
  optimizer = torch.optim.AdamW(groups, lr=OPTIMIZER["learning_rate"],
                                betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]), eps=OPTIMIZER["eps"])
  batch = synthetic_batch(cfg)
  image = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))
  text = batch["text"].astype(np.int64)
  counter = {"step": 0}

  def step():
    lr = learning_rate(counter["step"])
    for group in optimizer.param_groups:
      group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    image_features, text_features, logit_scale = model(torch.from_numpy(image),
                                                       torch.from_numpy(text))
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip_norm"])
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, OPTIMIZER["logit_scale_max"])
    counter["step"] += 1
    return loss.detach()

  params = sum(p.numel() for p in model.parameters())
  return step, float, {"params": params, "torch": torch.__version__,
                       "open_clip": open_clip.__version__,
                       "torch_threads": torch.get_num_threads()}


def _send(obj) -> None:
  sys.stdout.write(MARKER + json.dumps(obj) + "\n")
  sys.stdout.flush()


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(side: str, cfg: dict, threads: int, steps: int, warmup: int) -> None:
  """Builds one side, warms up, then runs a timed round of ``steps`` per ``round`` line read
  from stdin (answering ``{"ms": ...}``) until ``quit`` (answering the CPU evidence)."""
  t0 = time.perf_counter()
  step, sync, info = (_ours if side == "ours" else _open_clip)(cfg, threads)
  loss = sync(step())
  info["first_step_s"] = round(time.perf_counter() - t0, 2)  # build + compile + one step
  for _ in range(warmup):
    loss = sync(step())
  info.update(loss_after_warmup=loss, affinity=sorted(os.sched_getaffinity(0)))
  _send(dict(info, ready=True))
  cpu, wall, rounds_run, faults0 = 0.0, 0.0, 0, _faults()
  for line in sys.stdin:
    if line.strip() != "round":
      break
    rounds_run += 1
    # getrusage: microsecond CPU times (os.times() counts 10 ms clock ticks).
    c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
      loss = step()
    loss = sync(loss)
    w1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    wall += w1 - w0
    round_cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    kernel = c1.ru_stime - c0.ru_stime
    cpu += round_cpu
    _send({"ms": 1e3 * (w1 - w0) / steps, "cpu_ms": 1e3 * round_cpu / steps,
           "sys_ms": 1e3 * kernel / steps, "loss": loss})
  _send({"cpu_per_wall": round(cpu / max(wall, 1e-9), 3),
         "minor_faults_per_step": round((_faults() - faults0) / max(rounds_run, 1) / steps),
         "os_threads": len(os.listdir("/proc/self/task")), "loss_final": loss})


# ----------------------------------------------------------------------------------------
# The parent.


def _clean_env(threads: int, extra: Optional[dict] = None) -> dict:
  """The caller's environment without simulated devices, limited to ``threads``, plus
  ``extra``."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")
           and not f.startswith("--xla_cpu_multi_thread_eigen")]
  if threads == 1:
    flags.append("--xla_cpu_multi_thread_eigen=false")
  env["XLA_FLAGS"] = " ".join(flags)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", CUDA_VISIBLE_DEVICES="",
             OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"))
  env.update(extra or {})
  return env


class _Worker:
  """One side in a fresh process, talking line by line."""

  def __init__(self, side, cfg, threads, steps, warmup, env):
    self.side = side
    self.log = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--_side", side, "--_config",
         json.dumps(cfg), "--threads", str(threads), "--steps", str(steps),
         "--_warmup", str(warmup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        env=_clean_env(threads, env), cwd=REPO)

  def receive(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(MARKER):
        return json.loads(line[len(MARKER):])
    self.proc.wait(timeout=10)
    self.log.seek(0)
    raise RuntimeError(f"{self.side} worker exited ({self.proc.returncode}):\n"
                       f"{self.log.read()[-4000:]}")

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self.receive()

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self.log.close()


def run(quick: bool = False, threads: Optional[int] = None, steps: Optional[int] = None,
        rounds: Optional[int] = None, activation: str = "gelu_exact",
        env: Optional[dict] = None) -> dict:
  """Steady-state train-step time of ours and open_clip's on the same configuration.

  Args:
    quick: the tiny configuration and few steps (well under a minute in all).
    threads: CPU threads for both sides (None: every CPU this process may use).
    steps: steps per timed round (None: 3 quick, 10 otherwise).
    rounds: timed rounds per side, alternating (None: 3 quick, 7 otherwise).
    activation: ``gelu_exact`` (torch ``nn.GELU``, open_clip's default) or ``quick_gelu``.
    env: extra environment variables of both worker processes, e.g. an allocator:
      ``{"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
      "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}`` or
      ``{"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}`` (see the module docstring).

  Returns:
    ``{"skipped": message}`` without torch / open_clip; else a JSON-serialisable dict with
    ``config``, ``optimizer``, ``threads``, ``params_ours`` / ``params_open_clip``,
    ``step_ms_ours`` / ``step_ms_open_clip`` (median over rounds, milliseconds), the per-round
    times, ``ratio`` (ours / open_clip), ``goal``, ``met``, ``versions`` and per-side
    evidence of the thread limit (affinity, OS threads, CPU time / wall time).
  """
  message = missing_dependency()
  if message:
    return {"skipped": message}
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; expected one of {ACTIVATIONS}.")
  cfg = dict(CONFIGS["quick" if quick else "default"], activation=activation)
  threads = threads or len(os.sched_getaffinity(0))
  steps = steps or (3 if quick else 10)
  rounds = rounds or (3 if quick else 7)
  warmup = 2 if quick else 3
  workers = {}
  try:
    for side in ("ours", "open_clip"):  # built and warmed up side by side
      workers[side] = _Worker(side, cfg, threads, steps, warmup, env)
    ready = {side: w.receive() for side, w in workers.items()}
    load = [os.getloadavg()[0]]
    times = {side: [] for side in workers}
    cpu_times = {side: [] for side in workers}
    sys_times = {side: [] for side in workers}
    losses = {side: [] for side in workers}
    for _ in range(rounds):
      for side, w in workers.items():
        answer = w.ask("round")
        times[side].append(answer["ms"])
        cpu_times[side].append(answer["cpu_ms"])
        sys_times[side].append(answer["sys_ms"])
        losses[side].append(answer["loss"])
    evidence = {side: w.ask("quit") for side, w in workers.items()}
    load.append(os.getloadavg()[0])
  finally:
    for w in workers.values():
      w.close()
  ms = {side: statistics.median(t) for side, t in times.items()}
  cpu_ms = {side: statistics.median(t) for side, t in cpu_times.items()}
  ratio = ms["ours"] / ms["open_clip"]
  params = {side: ready[side]["params"] for side in workers}
  return {
      "config": cfg, "optimizer": OPTIMIZER, "threads": threads, "steps_per_round": steps,
      "rounds": rounds, "dtype": "float32",
      "params_ours": params["ours"], "params_open_clip": params["open_clip"],
      "params_rel_diff": abs(params["ours"] - params["open_clip"]) / params["open_clip"],
      "step_ms_ours": round(ms["ours"], 3), "step_ms_open_clip": round(ms["open_clip"], 3),
      "round_ms": {s: [round(t, 3) for t in v] for s, v in times.items()},
      # CPU time of all the process's threads per step (median over rounds): with one thread
      # it is the least disturbed by other work on a shared machine.
      "cpu_ms_ours": round(cpu_ms["ours"], 3), "cpu_ms_open_clip": round(cpu_ms["open_clip"], 3),
      "cpu_ratio": round(cpu_ms["ours"] / cpu_ms["open_clip"], 4),
      "sys_ms": {s: round(statistics.median(v), 3) for s, v in sys_times.items()},
      "ratio": round(ratio, 4), "goal": GOAL, "met": bool(ratio <= GOAL),
      "first_step_s": {s: ready[s]["first_step_s"] for s in workers},
      "loss": {s: losses[s][-1] for s in workers},
      "thread_evidence": {s: dict(affinity=ready[s]["affinity"], **evidence[s])
                          for s in workers},
      "xla_flags": _clean_env(threads)["XLA_FLAGS"], "env": dict(env or {}),
      "load_average_1min": load,  # other work on the machine (before, after the timing)
      "versions": {"jax": ready["ours"]["jax"], "torch": ready["open_clip"]["torch"],
                   "open_clip": ready["open_clip"]["open_clip"]},
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--activation", default="gelu_exact", choices=ACTIVATIONS)
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable of both workers (repeatable)")
  parser.add_argument("--output", default=None)
  parser.add_argument("--_side", choices=("ours", "open_clip"), help=argparse.SUPPRESS)
  parser.add_argument("--_config", help=argparse.SUPPRESS)
  parser.add_argument("--_warmup", type=int, default=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._side:
    _limit_threads(args.threads)
    worker(args._side, json.loads(args._config), args.threads, args.steps, args._warmup)
    return
  result = run(quick=args.quick, threads=args.threads, steps=args.steps, rounds=args.rounds,
               activation=args.activation, env=dict(e.split("=", 1) for e in args.env))
  if "skipped" in result:
    print(result["skipped"])
  else:
    c = result["config"]
    print(f"ViT CLIP: image {c['image_size']}/{c['patch_size']}, vision {c['vision_width']}x"
          f"{c['vision_depth']}, text {c['text_width']}x{c['text_depth']} ctx "
          f"{c['context_length']}, embed {c['embed_dim']}, batch {c['batch']}, float32, "
          f"{result['threads']} thread(s)")
    print(f"params: ours {result['params_ours']:,}, open_clip {result['params_open_clip']:,}")
    print(f"step ms: ours {result['step_ms_ours']}, open_clip {result['step_ms_open_clip']}; "
          f"ratio {result['ratio']} (goal <= {GOAL}: {'met' if result['met'] else 'not met'})")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
