"""Configs: ARGS parsing, --config.a.b overrides, unknown keys fail with the key's name."""

import pytest

from conftest import REPO, load_config, run_module
from contrastive_jax import config_args


def test_parse_arg_types_and_unknown_keys():
  out = config_args.parse_arg("size=tiny,steps=20,fast", size="cpu", steps=0, fast=False)
  assert (out.size, out.steps, out.fast) == ("tiny", 20, True)
  with pytest.raises(ValueError, match="'bogus'"):
    config_args.parse_arg("bogus=1", size="cpu")
  with pytest.raises(ValueError, match="boolean"):
    config_args.parse_arg("fast=maybe", fast=False)


def test_config_sizes():
  assert load_config("clip_shapes", "size=tiny").total_steps < load_config("clip_shapes").total_steps
  assert load_config("clip_shapes", "steps=7").total_steps == 7
  with pytest.raises(ValueError, match="size"):
    load_config("clip_shapes", "size=huge")


def test_cli_overrides_and_unknown_key(tmp_path):
  base = [f"--config={REPO}/configs/clip_shapes.py:size=tiny,steps=2",
          f"--workdir={tmp_path}/w"]
  bad = run_module(["contrastive_jax.train", *base, "--config.model.bogus_key=3"], timeout=300)
  assert bad.returncode != 0
  assert "bogus_key" in bad.stderr
  typo = run_module(["contrastive_jax.train", *base, "--config.batch_size=abc"], timeout=300)
  assert typo.returncode != 0 and "batch_size" in typo.stderr
  ok = run_module(["contrastive_jax.train", *base, "--config.batch_size=24",
                   "--config.eval.evaluators.retrieval.num_examples=48"], timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "global batch 24" in ok.stderr
