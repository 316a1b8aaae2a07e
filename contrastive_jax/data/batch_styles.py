"""Batch Styles Standardization (BSS; Scalbert et al., ICLR 2024), METHODS.md §2.9.

An in-graph (jax) batch augmentation: every image of a batch gets the low-frequency Fourier
amplitude ("style") of one randomly chosen image of the same batch and keeps its own phase
("content") and its own high-frequency amplitude. All images of the batch then share one
style, so negatives cannot be told apart by style / domain cues.

Per image and channel, with ``F = FFT2(x)``, amplitude ``|F|`` and phase ``∠F``:

  ``F' = M · |F_s| · e^{i∠F} + (1 − M) · F``,  ``x' = Re IFFT2(F')``

where ``s`` is the source image and ``M`` the centred low-frequency box
``|f_y| ≤ √r·H/2, |f_x| ≤ √r·W/2`` (``f`` the signed integer frequencies), covering about a
fraction ``r`` of the spectrum; ``r = 0`` is the identity, ``r = 1`` swaps every amplitude.
``M`` is symmetric under ``f → −f``, so ``F'`` stays Hermitian and ``x'`` is real.

Distribution: the op runs on whatever rows it is given; inside ``shard_map`` each device
standardises its own rows to a style of its own (METHODS.md's per-device default). Output
values may leave the input range (no clipping, as in Fourier-domain style transfer). The
paper pairs BSS with batch-wise colour jitter; that part is not implemented here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def low_frequency_mask(height: int, width: int, ratio: float) -> jax.Array:
  """bool ``[H, W]``, True on the centred low-frequency box of area ratio ≈ ``ratio``, in the
  FFT's natural (unshifted) layout. All False for ``ratio = 0``."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"BSS ratio r={ratio}; expected 0 <= r <= 1.")
  if ratio == 0.0:
    return jnp.zeros((height, width), bool)
  side = math.sqrt(ratio)
  fy = jnp.abs(jnp.fft.fftfreq(height) * height)
  fx = jnp.abs(jnp.fft.fftfreq(width) * width)
  return (fy[:, None] <= side * height / 2) & (fx[None, :] <= side * width / 2)


def standardize_to(images, source, ratio: float):
  """Gives every image the low-frequency amplitude of ``images[source]`` (no randomness).

  Args:
    images: float ``[N, H, W, C]``.
    source: int scalar, the row whose style is used.
    ratio: ``r`` in ``[0, 1]``.

  Returns:
    float32 ``[N, H, W, C]`` (no gradient).
  """
  x = jax.lax.stop_gradient(jnp.asarray(images, jnp.float32))
  if ratio == 0.0:
    return x
  spec = jnp.fft.fft2(x, axes=(1, 2))  # [N, H, W, C] complex64
  amp = jnp.abs(spec)
  phase = jnp.exp(1j * jnp.angle(spec))
  mask = low_frequency_mask(x.shape[1], x.shape[2], ratio)[None, :, :, None]
  styled = jnp.where(mask, amp[source][None] * phase, spec)
  return jnp.real(jnp.fft.ifft2(styled, axes=(1, 2))).astype(jnp.float32)


def batch_style_standardize(images, key, r: float):
  """BSS on one batch of one view: a random source image's style for every image.

  Args:
    images: float ``[N, H, W, C]`` (a device's rows of one view).
    key: PRNG key choosing the source image (draw a fresh one per view and step).
    r: low-frequency area ratio in ``[0, 1]`` (0: identity).

  Returns:
    float32 ``[N, H, W, C]`` (no gradient). A batch of one image is returned unchanged (up to
    FFT round-off).
  """
  source = jax.random.randint(key, (), 0, images.shape[0])
  return standardize_to(images, source, r)
