"""AD-CLIP: prompt learning for unsupervised domain adaptation of a frozen CLIP (METHODS.md §2.16).

Both towers are frozen (loaded from ``config.model.frozen_params``, an npz of ``/``-flattened
two-tower parameters, and kept in the objective state, never in the trained ``params``). Only
the prompt learner trains: per image, the *style* of every image-encoder block (mean and std
of its token features) gives one domain token through a per-block projector, the *content*
(the pooled image embedding) gives one image token through a small MLP; the ``M = depth + 1``
tokens are added to a learned base context (initialised from the token embeddings of
``config.adclip.ctx_init``) and inserted into every class prompt, which the frozen text tower
encodes from embeddings. The class scores of image ``n`` are the cosines of its image embedding
with the text features of its own prompts (``[N, C]``; ``N·C`` text sequences per batch).

Loss (global over the devices; each local shard is half source, half target):

  L = CE(source labels) + w_align·MSE(mean source tokens, mean target tokens)
      + w_ent·H(target predictions) + w_kl·KL(p̄_source ‖ p̄_target)

``p̄`` are the batch-mean class distributions (KL between *distributions*; the reference code's
KL on raw text features, METHODS.md §3.3, is not copied). Target images are the second half
of each local shard passed through ``config.adclip.target`` (``"haze"``: ``α·x + (1-α)·level``,
a washed-out domain that takes the shapes CLIP from 0.96 to ~0.48 zero-shot accuracy); their
labels are never used by the loss (only logged as ``target_acc``).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from flax import traverse_util

from contrastive_jax.data import shapes
from contrastive_jax.models.transformer import EncoderBlock, Transformer
from contrastive_jax.objectives import base

TARGETS = ("haze",)


def haze(image, alpha: float = 0.6, level: float = 0.75):
  """The target domain: ``alpha·image + (1 - alpha)·level`` (images in ``[-1, 1]``)."""
  return alpha * image + (1.0 - alpha) * level


def entropy(logits, axis=-1):
  """Shannon entropy (nats) of ``softmax(logits)`` along ``axis``, float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
  return -(jnp.exp(logp) * logp).sum(axis)


def kl_divergence(p, q, eps: float = 1e-8):
  """``KL(p ‖ q) = Σ p (log p - log q)`` of probability vectors along the last axis."""
  return (p * (jnp.log(p + eps) - jnp.log(q + eps))).sum(-1)


def style_statistics(tokens):
  """``[N, T, W]`` token features -> ``[N, 2W]``: their mean and std over tokens (float32)."""
  tokens = tokens.astype(jnp.float32)
  mean = tokens.mean(axis=1)
  std = jnp.sqrt(tokens.var(axis=1) + 1e-6)
  return jnp.concatenate([mean, std], axis=-1)


class PromptLearner(nn.Module):
  """Style / content projectors and the base context.

  ``__call__(style [N, K, S], content [N, E]) -> (ctx [N, K + 1, W], domain [N, K, W])``:
  ``domain[:, k] = Dense_k(style[:, k])`` (one token per encoder block), the image token
  ``MLP(content)``; both added to ``base [K + 1, W]``. The projectors' last layers start at
  zero, so the initial prompt is ``base`` for every image (:class:`AdClip` initialises it to
  ``ctx_init``'s token embeddings).
  """

  width: int
  num_ctx: int
  hidden: int = 64

  @nn.compact
  def __call__(self, style, content):
    k = style.shape[1]
    zeros = nn.initializers.zeros
    domain = jnp.stack([nn.Dense(self.width, kernel_init=zeros, name=f"style{i}")(style[:, i])
                        for i in range(k)], axis=1)
    h = nn.relu(nn.Dense(self.hidden, name="content_hidden")(content))
    image_token = nn.Dense(self.width, kernel_init=zeros, name="content_out")(h)
    base_ctx = self.param("base", nn.initializers.zeros, (self.num_ctx, self.width))
    ctx = base_ctx[None] + jnp.concatenate([domain, image_token[:, None]], axis=1)
    return ctx, domain


def prompt_layout(class_tokens: np.ndarray, class_lengths: np.ndarray, num_ctx: int, eot_id: int):
  """Static layout of ``class phrase + M context tokens + EOT`` sequences.

  Returns int32 ``(token_ids [C, L], ctx_index [C, L], eot_pos [C])``: ``ctx_index`` is the
  context slot at each position (-1 where the position holds ``token_ids``, padding 0 after
  the EOT), ``L = max length + M + 1``.
  """
  c = len(class_lengths)
  length = int(class_lengths.max()) + num_ctx + 1
  ids = np.zeros((c, length), np.int32)
  ctx_index = np.full((c, length), -1, np.int32)
  for i, n in enumerate(class_lengths):
    ids[i, :n] = class_tokens[i, :n]
    ctx_index[i, n:n + num_ctx] = np.arange(num_ctx)
    ids[i, n + num_ctx] = eot_id
  return ids, ctx_index, (class_lengths + num_ctx).astype(np.int32)


def encode_prompts(text_config: dict, towers, ctx, token_ids, ctx_index, eot_pos):
  """The frozen text tower on prompts given partly as embeddings.

  Args:
    text_config: the two-tower's ``text`` kwargs (``depth``, ``num_heads``, ...).
    towers: two-tower params (``text_tower``, ``text_proj``).
    ctx: float32 ``[N, M, W]`` context embeddings per image.
    token_ids / ctx_index / eot_pos: :func:`prompt_layout` (``[C, L]``, ``[C, L]``, ``[C]``).
  Returns:
    float32 ``[N, C, E]`` text features (unnormalised), as ``TwoTower.encode_text`` computes
    them for token sequences.
  """
  tt = towers["text_tower"]
  n, c, length = ctx.shape[0], token_ids.shape[0], token_ids.shape[1]
  tok = jnp.asarray(tt["token_embed"]["embedding"])[token_ids]  # [C, L, W]
  slot = jnp.maximum(ctx_index, 0)
  x = jnp.where((ctx_index >= 0)[None, :, :, None], ctx[:, slot], tok[None])  # [N, C, L, W]
  x = x.reshape(n * c, length, -1) + tt["pos_embed"][:, :length]
  keys = ("depth", "num_heads", "mlp_ratio", "activation", "layer_norm_epsilon", "mlp_dim")
  encoder = Transformer(**{k: text_config[k] for k in keys if k in text_config})
  causal = nn.make_causal_mask(jnp.ones((n * c, length), jnp.int32))
  x = encoder.apply({"params": tt["encoder"]}, x, causal)
  eot = jnp.tile(jnp.asarray(eot_pos), n)
  pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
  return (pooled @ towers["text_proj"]["kernel"]).reshape(n, c, -1).astype(jnp.float32)


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def load_frozen(path: str, abstract) -> dict:
  """Two-tower params from an npz of ``/``-flattened arrays, checked against ``abstract``."""
  with np.load(path) as f:
    params = traverse_util.unflatten_dict({k: np.asarray(f[k]) for k in f.files}, sep="/")
  want = jax.tree.map(lambda s: (s.shape, s.dtype), abstract)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"config.model.frozen_params={path!r} does not match config.model "
                     f"(the checkpoint's architecture must be configured).")
  return params


class AdClip:
  """AD-CLIP prompt learning on frozen towers (see the module docstring).

  ``params``: the :class:`PromptLearner`'s; objective state ``{"towers": two-tower params}``
  (frozen, returned unchanged). ``eval_variables`` are the frozen towers, so the standard
  evaluators score the frozen CLIP; :meth:`class_logits` scores with the learned prompts.
  """

  batch_keys = ("image", "label")

  def __init__(self, config, tokenizer):
    self.model = base.clip_two_tower(config, tokenizer)
    self.text_config = dict(self.model.text)
    self.frozen_path: Optional[str] = config.model.get("frozen_params")
    a = config.adclip
    if a.target not in TARGETS:
      raise ValueError(f"config.adclip.target={a.target!r}; expected one of {TARGETS}.")
    self.haze_alpha, self.haze_level = a.haze_alpha, a.haze_level
    self.w_align, self.w_ent, self.w_kl = a.align_weight, a.entropy_weight, a.kl_weight
    self.depth = config.model.image.depth
    num_ctx = self.depth + 1
    phrases = [shapes._a(name) for name in shapes.CLASS_NAMES]  # "a red circle", ...
    tokens, mask = (t.numpy() for t in tokenizer.tokenize(tf.constant(phrases)))
    lengths = mask.sum(1) - 1  # without the EOT
    self.layout = prompt_layout(tokens, lengths, num_ctx, tokenizer.eot_id)
    init, init_mask = (t.numpy() for t in tokenizer.tokenize(tf.constant([a.ctx_init])))
    init_ids = init[0, :init_mask[0].sum() - 1]
    if len(init_ids) != num_ctx:
      raise ValueError(f"config.adclip.ctx_init={a.ctx_init!r} has {len(init_ids)} tokens; "
                       f"the prompt has depth + 1 = {num_ctx} context tokens.")
    self._ctx_init_ids = init_ids
    self.learner = PromptLearner(width=self.text_config["width"], num_ctx=num_ctx)

  # -- pieces --------------------------------------------------------------------------------

  def features(self, towers, images):
    """Frozen image features: ``(emb [N, E], style [N, depth, 2W])``, without gradient."""
    towers = jax.lax.stop_gradient(towers)
    is_block = lambda module, _: isinstance(module, EncoderBlock)
    (emb, _), inter = self.model.apply({"params": towers}, images, method=self.model.encode_image,
                                       capture_intermediates=is_block, mutable=["intermediates"])
    blocks = inter["intermediates"]["image_tower"]["encoder"]
    style = jnp.stack([style_statistics(blocks[f"block{i}"]["__call__"][0])
                       for i in range(self.depth)], axis=1)
    return jax.lax.stop_gradient(emb), jax.lax.stop_gradient(style)

  def _logits(self, params, towers, images):
    """``(logits [N, C], domain tokens [N, depth, W])`` with the learned prompts."""
    emb, style = self.features(towers, images)
    ctx, domain = self.learner.apply({"params": params}, style, _normalize(emb))
    text = encode_prompts(self.text_config, jax.lax.stop_gradient(towers), ctx, *self.layout)
    scale = jnp.exp(jax.lax.stop_gradient(towers["logit_scale"]))
    logits = scale * jnp.einsum("ne,nce->nc", _normalize(emb), _normalize(text))
    return logits, domain

  def class_logits(self, params, state, images):
    """``[N, C]`` scores over ``shapes.CLASS_NAMES`` with the learned, per-image prompts."""
    return self._logits(params, state["towers"], images)[0]

  def target_images(self, images):
    return haze(images, self.haze_alpha, self.haze_level)

  # -- objective interface -------------------------------------------------------------------
  def init(self, rng, batch):
    image = batch["image"][:1]
    tokens = jnp.zeros((1, self.layout[0].shape[1]), jnp.int32)
    init_towers = lambda r: nn.meta.unbox(self.model.init(r, image, tokens, tokens > 0))["params"]
    if self.frozen_path:
      towers = load_frozen(self.frozen_path, jax.eval_shape(init_towers, rng))
    else:  # no checkpoint: random towers (for shape checks only)
      towers = init_towers(jax.random.fold_in(rng, 1))
    towers = jax.tree.map(jnp.asarray, towers)
    emb, style = self.features(towers, image)
    params = self.learner.init(jax.random.fold_in(rng, 2), style, _normalize(emb))["params"]
    table = towers["text_tower"]["token_embed"]["embedding"]
    params = dict(params, base=jnp.asarray(table)[self._ctx_init_ids].astype(jnp.float32))
    return params, {"towers": towers}

  def eval_variables(self, params, state):
    del params
    return {"params": state["towers"]}

  def loss(self, params, state, batch, rng, *, axis_name=None):
    """The AD-CLIP loss on the local shard (first half source, second half target)."""
    del rng
    images, labels = batch["image"], batch["label"]
    b = images.shape[0]
    if b % 2:
      raise ValueError(f"AD-CLIP splits each local shard into source and target halves; "
                       f"{b} rows per device is odd.")
    h = b // 2
    src, tgt = images[:h], self.target_images(images[h:])
    logits, domain = self._logits(params, state["towers"], jnp.concatenate([src, tgt]))
    ls, lt = logits[:h], logits[h:]
    psum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)
    y = labels[:h]
    valid = (y >= 0).astype(jnp.float32)
    n_src = jnp.maximum(psum(valid.sum()), 1.0)
    n_tgt = psum(jnp.float32(b - h))
    logp = jax.nn.log_softmax(ls)
    ce = psum(-(jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], 1)[:, 0]
                * valid).sum()) / n_src
    ent = psum(entropy(lt).sum()) / n_tgt
    p_src = psum((jnp.exp(logp) * valid[:, None]).sum(0)) / n_src
    p_tgt = psum(jax.nn.softmax(lt).sum(0)) / n_tgt
    kl = kl_divergence(p_src, p_tgt)
    d_src = psum((domain[:h] * valid[:, None, None]).sum(0)) / n_src
    d_tgt = psum(domain[h:].sum(0)) / n_tgt
    align = jnp.mean((d_src - d_tgt) ** 2)
    loss = ce + self.w_align * align + self.w_ent * ent + self.w_kl * kl
    sg = jax.lax.stop_gradient
    t_labels = labels[h:]
    t_valid = (t_labels >= 0).astype(jnp.float32)
    metrics = dict(
        ce=ce, entropy=ent, kl=kl, align=align,
        source_acc=sg(psum(((ls.argmax(1) == y) * valid).sum()) / n_src),
        target_acc=sg(psum(((lt.argmax(1) == t_labels) * t_valid).sum())
                      / jnp.maximum(psum(t_valid.sum()), 1.0)))
    return loss, (metrics, state)
