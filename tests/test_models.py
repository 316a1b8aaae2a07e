"""Model outputs: shapes, dtypes, EOT pooling, padding invariance, logit-scale init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models import TwoTower, ViT

IMAGE = dict(patch_size=8, width=32, depth=1, num_heads=2, pool="cls")
TEXT = dict(vocab_size=258, context_length=10, width=32, depth=2, num_heads=2)


def _inputs():
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  text = jnp.array([[5, 6, 7, 257, 0, 0, 0, 0, 0, 0]] * 3, jnp.int32)
  mask = text != 0
  return images, text, mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_two_tower_outputs(dtype):
  model = TwoTower(image=IMAGE, text=TEXT, embed_dim=24, dtype=dtype)
  images, text, mask = _inputs()
  params = model.init(jax.random.key(1), images, text, mask)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = model.apply({"params": params}, images, text, mask)
  assert out["image_emb"].shape == (3, 24) and out["text_emb"].shape == (3, 24)
  assert out["image_tokens"].shape == (3, 4, 24) and out["text_tokens"].shape == (3, 10, 24)
  assert all(out[k].dtype == jnp.float32 for k in ("image_emb", "text_emb", "image_tokens"))
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(params["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
  assert "logit_bias" not in out


def test_text_pooling_ignores_padding_and_uses_eot():
  model = TwoTower(image=IMAGE, text=TEXT, embed_dim=24)
  images, text, mask = _inputs()
  params = model.init(jax.random.key(1), images, text, mask)["params"]
  emb, tokens = model.apply({"params": params}, text, mask, method=model.encode_text)
  garbage = text.at[:, 5:].set(99)  # change padding only
  emb2, _ = model.apply({"params": params}, garbage, mask, method=model.encode_text)
  np.testing.assert_allclose(emb, emb2, rtol=1e-6)
  # The pooled feature is the projected token feature at the EOT position (index 3).
  np.testing.assert_allclose(emb, tokens[:, 3], rtol=1e-6)
  changed = text.at[:, 1].set(9)  # a real token changes the embedding
  emb3, _ = model.apply({"params": params}, changed, mask, method=model.encode_text)
  assert np.abs(emb3 - emb).max() > 1e-4


def test_vit_pools_and_rejects_bad_sizes():
  images = jnp.zeros((2, 16, 16, 3))
  for pool, tokens in (("cls", 4), ("mean", 4)):
    vit = ViT(**dict(IMAGE, pool=pool))
    (pooled, toks), _ = vit.init_with_output(jax.random.key(0), images)
    assert pooled.shape == (2, 32) and toks.shape == (2, tokens, 32)
  with pytest.raises(ValueError, match="divisible"):
    ViT(**IMAGE).init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
  with pytest.raises(ValueError, match="pool"):
    ViT(**dict(IMAGE, pool="max")).init(jax.random.key(0), images)
