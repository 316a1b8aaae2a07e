"""Test set-up: 8 simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# tf.data runs on the CPU only; keep it away from any accelerator JAX owns.
tf.config.set_visible_devices([], "GPU")

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_STEPS = 60


def load_config(name: str, arg: str = ""):
  """``configs/<name>.py`` ``get_config(arg)``, unlocked, as the CLI would build it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(name: str = "clip_shapes", **overrides):
  """``configs/<name>.py`` at ``size=tiny`` with ``{"a.b": value}`` (or ``a__b=value``) set."""
  config = load_config(name, f"size=tiny,steps={TINY_STEPS}")
  for key, value in overrides.items():
    key = key.replace("__", ".")
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One tiny CLIP training run on 8 devices, shared by the trainer/evaluation tests.

  Returns ``(config, workdir, final_eval_metrics)``.
  """
  from contrastive_jax import train
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def run_module(args, timeout=600, env=None):
  """Runs ``python -m <args>`` from the repo root; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, **dict({"PYTHONPATH": str(REPO)}, **(env or {})))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
