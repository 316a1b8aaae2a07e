"""PixPro's pixel-to-propagation consistency (Xie et al., CVPR 2021), METHODS.md §1.10.

Geometry. Each view carries its crop box ``(x0, y0, x1, y1)`` in normalised coordinates of
the original image (a horizontally flipped view has ``x0 > x1``). Bin ``(u, v)`` of an
``h × w`` feature map covers the centre point

  ``(x0 + (u + ½)(x1 − x0)/w,  y0 + (v + ½)(y1 − y0)/h)``

and pixel ``i`` of view 1 and pixel ``j`` of view 2 are a positive pair when the distance of
their centres, divided by the larger of the two views' bin diagonals, is below ``T = 0.7``.

Pixel propagation. ``y_i = Σ_j max(x̂_i·x̂_j, 0)^γ · g(x)_j`` over the pixels of one image
(``g`` = the learnable value transform, applied and normalised by the caller).

Loss. With ``ŷ`` the per-pixel normalised propagated online maps and ``k̂`` the normalised
momentum maps (no gradient),

  ``reg(ŷ, k̂ | M) = −(1/B) Σ_n Σ_ij M_ij ŷ_i·k̂_j / (Σ_ij M_ij + 1e−6)``
  ``L = 2·reg(ŷ¹, k̂² | M¹²) + 2·reg(ŷ², k̂¹ | M²¹)``

(−4 at perfect agreement; an image without positive pairs contributes 0 but still counts in
``B``). The loss is per image, so the distributed form gathers nothing: the local sums are
``psum``'d and divided by the global batch size. Depends on jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses import common

# Added to the number of positive pairs of an image (the reference's convention).
MASK_EPS = 1e-6


def bin_centers(boxes, height: int, width: int):
  """Centres of the ``height × width`` feature bins in original-image coordinates.

  Args:
    boxes: float ``[b, 4]`` crop boxes ``(x0, y0, x1, y1)``, normalised coordinates.
    height: ``h``, rows of the feature map.
    width: ``w``, columns of the feature map.

  Returns:
    float32 ``[b, h·w, 2]`` ``(x, y)`` centres, pixels in row-major order (pixel
    ``v·w + u`` is row ``v``, column ``u``: the order of ``fmap.reshape(b, h·w, C)``).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
  u = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  v = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  cx = x0 + u[None, :] * (x1 - x0)  # [b, w]
  cy = y0 + v[None, :] * (y1 - y0)  # [b, h]
  b = boxes.shape[0]
  cx = jnp.broadcast_to(cx[:, None, :], (b, height, width))
  cy = jnp.broadcast_to(cy[:, :, None], (b, height, width))
  return jnp.stack([cx, cy], axis=-1).reshape(b, height * width, 2)


def _bin_diagonal(boxes, height, width):
  """``[b]`` diagonal of one feature bin of each box (sign of a flip does not matter)."""
  bw = (boxes[:, 2] - boxes[:, 0]) / width
  bh = (boxes[:, 3] - boxes[:, 1]) / height
  return jnp.sqrt(bw * bw + bh * bh)


def positive_pixel_mask(boxes1, boxes2, height: int, width: int, threshold: float = 0.7):
  """Geometrically matched pixel pairs of two views (no gradient; boxes are data).

  Args:
    boxes1: float ``[b, 4]`` boxes of view 1 (see :func:`bin_centers`).
    boxes2: float ``[b, 4]`` boxes of view 2.
    height: ``h`` of both feature maps.
    width: ``w`` of both feature maps.
    threshold: ``T``; positives have centre distance / max bin diagonal ``< T``.

  Returns:
    bool ``[b, h·w, h·w]``; entry ``[n, i, j]`` pairs pixel ``i`` of view 1 with pixel ``j``
    of view 2 (swapping the views transposes the last two axes).
  """
  boxes1 = jax.lax.stop_gradient(jnp.asarray(boxes1, jnp.float32))
  boxes2 = jax.lax.stop_gradient(jnp.asarray(boxes2, jnp.float32))
  c1 = bin_centers(boxes1, height, width)
  c2 = bin_centers(boxes2, height, width)
  diff = c1[:, :, None, :] - c2[:, None, :, :]
  dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  diag = jnp.maximum(_bin_diagonal(boxes1, height, width),
                     _bin_diagonal(boxes2, height, width))
  return dist / diag[:, None, None] < threshold


def pixel_propagation(x, value, gamma: float = 2.0):
  """PixPro's pixel propagation module on each image's pixels (METHODS.md §1.10).

  Args:
    x: ``[b, N, C]`` (or ``[b, h, w, C]``) online projector features; normalised per pixel
      inside, in float32.
    value: ``[b, N, C']`` (or ``[b, h, w, C']``) the transformed values ``g(x)``, already
      normalised by the caller.
    gamma: sharpness ``γ ≥ 1`` of ``A_ij = max(x̂_i·x̂_j, 0)^γ`` (2 in the paper); an integer
      value uses an exact integer power.

  Returns:
    float32 ``y`` of ``value``'s shape with ``y_i = Σ_j A_ij value_j`` (not normalised; no
    softmax and no row normalisation of ``A``).
  """
  shape = value.shape
  b = x.shape[0]
  xf = common.l2_normalize(x.reshape(b, -1, x.shape[-1]))
  vf = value.reshape(b, -1, shape[-1]).astype(jnp.float32)
  sim = jnp.maximum(jnp.einsum("bic,bjc->bij", xf, xf), 0.0)
  if float(gamma).is_integer():
    sim = jax.lax.integer_pow(sim, int(gamma))
  else:
    sim = jnp.power(sim, gamma)
  return jnp.einsum("bij,bjc->bic", sim, vf).reshape(shape)


def _consistency(y, k, mask):
  """Per-image ``Σ M_ij ŷ_i·k̂_j`` ``[b]`` (y, k normalised ``[b, N, C]``)."""
  cos = jnp.einsum("bic,bjc->bij", y, k)
  return jnp.sum(jnp.where(mask, cos, 0.0), axis=(1, 2))


def pixpro_loss(y1, y2, k1, k2, boxes1, boxes2, *, threshold: float = 0.7, axis_name=None):
  """Symmetrised PixPro consistency loss, mean over the global batch.

  Args:
    y1: ``[b, h, w, C]`` propagated online map of view 1 (any float dtype; normalised per
      pixel inside, in float32); the local shard when ``axis_name`` is given.
    y2: ``[b, h, w, C]`` propagated online map of view 2.
    k1: ``[b, h, w, C]`` momentum-encoder map of view 1 (``stop_gradient`` inside).
    k2: ``[b, h, w, C]`` momentum-encoder map of view 2.
    boxes1: float ``[b, 4]`` crop boxes of view 1 ``(x0, y0, x1, y1)``, flipped views with
      ``x0 > x1``.
    boxes2: float ``[b, 4]`` crop boxes of view 2.
    threshold: positive-pair threshold ``T`` on the normalised centre distance.
    axis_name: mapped data axis (inside ``shard_map`` / ``pmap``), or None.

  Returns:
    ``(loss, metrics)``: the float32 global-batch loss ``2·reg(ŷ¹, k̂²) + 2·reg(ŷ², k̂¹)``
    (−4 at perfect agreement), the same on every device, whose gradient w.r.t. the local
    ``y1, y2`` equals the single-device gradient on the concatenated batch; ``metrics``:
    ``pos_fraction`` (fraction of the ``(h·w)²`` pixel pairs that are positive),
    ``pos_cos`` (mean cosine over all positive pairs of both directions) and
    ``empty_fraction`` (images without a positive pair).
  """
  if y1.shape != k2.shape or y2.shape != k1.shape or y1.shape != y2.shape or y1.ndim != 4:
    raise ValueError(f"pixpro_loss needs four [b, h, w, C] maps of one shape; got y1 "
                     f"{y1.shape}, y2 {y2.shape}, k1 {k1.shape}, k2 {k2.shape}.")
  b, h, w, c = y1.shape
  flat = lambda t: common.l2_normalize(t.reshape(b, h * w, c))
  y1, y2 = flat(y1), flat(y2)
  k1, k2 = (flat(jax.lax.stop_gradient(t)) for t in (k1, k2))
  mask12 = positive_pixel_mask(boxes1, boxes2, h, w, threshold)
  mask21 = jnp.swapaxes(mask12, 1, 2)
  count = jnp.sum(mask12, axis=(1, 2)).astype(jnp.float32)  # [b], same for both directions
  sum12 = _consistency(y1, k2, mask12)
  sum21 = _consistency(y2, k1, mask21)

  global_b = b if axis_name is None else b * jax.lax.axis_size(axis_name)
  mean = lambda t: common.global_sum(jnp.sum(t), axis_name) / global_b
  reg12 = -mean(sum12 / (count + MASK_EPS))
  reg21 = -mean(sum21 / (count + MASK_EPS))
  loss = 2.0 * reg12 + 2.0 * reg21

  total = common.global_sum(jnp.sum(count), axis_name)
  metrics = {
      "pos_fraction": mean(count) / (h * w) ** 2,
      "pos_cos": common.global_sum(jnp.sum(sum12 + sum21), axis_name)
                 / jnp.maximum(2.0 * total, 1.0),
      "empty_fraction": mean((count == 0).astype(jnp.float32)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
