"""Losses trace at a global batch whose B² overflows int32 (found by benchmarks/gpu_scale.py:
the ring metrics' negative count was a Python int that JAX turned into int32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import losses

B = 65_536  # B² = 2³²
D = 4


def _emb(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


E, E3, MASK = _emb(B, D), _emb(B, 2, D), jax.ShapeDtypeStruct((B, 2), jnp.bool_)
CASES = {  # name -> (loss of abstract arrays, arrays)
    "clip": (lambda x, y: losses.clip_loss(x, y, 10.0), (E, E)),
    "ring_clip": (lambda x, y: losses.ring_clip_loss(x, y, 10.0, block_size=1024), (E, E)),
    "siglip": (lambda x, y: losses.siglip_loss(x, y, 10.0, -10.0), (E, E)),
    "ring_siglip": (lambda x, y: losses.ring_siglip_loss(x, y, 10.0, -10.0, block_size=1024),
                    (E, E)),
    "nt_xent": (losses.nt_xent_loss, (E, E)),
    "ring_nt_xent": (lambda x, y: losses.ring_nt_xent_loss(x, y, block_size=1024), (E, E)),
    "dcl": (losses.dcl_loss, (E, E)),
    "ring_dcl": (lambda x, y: losses.ring_dcl_loss(x, y, block_size=1024), (E, E)),
    "ring_multi_positive": (
        lambda x, y: losses.ring_multi_positive_loss(x, y, 10.0, block_size=1024), (E, E3)),
    "ring_filip": (lambda x, y, m: losses.ring_filip_loss(x, y, m, 10.0, block_size=1024),
                   (E3, E3, MASK)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_traces_when_batch_squared_overflows_int32(name):
  fn, args = CASES[name]
  loss, metrics = jax.eval_shape(fn, *args)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(metrics) if hasattr(m, "dtype"))


def test_multi_positive_negative_mean_is_exact_past_int32():
  """The ring multi-positive neg_logit divides by (B − 1) · valid texts, counted in float32."""
  b, t = 4, 2
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(b, 8)), rng.normal(size=(b, t, 8))
  _, ring = losses.ring_multi_positive_loss(x, y, 3.0)
  _, ref = losses.multi_positive_loss(x, y, 3.0)
  np.testing.assert_allclose(ring["neg_logit"], ref["neg_logit"], rtol=1e-5)
