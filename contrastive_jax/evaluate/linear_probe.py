"""Linear probe: multinomial logistic regression on frozen features.

Features are standardised with the training set's mean and standard deviation, then a
``[D, C]`` softmax classifier with L2 penalty ``l2 · ||W||²/2`` is fitted full-batch by
L-BFGS (optax), the usual protocol for small datasets (CLIP's linear probes use L-BFGS
logistic regression too). Deterministic: zero initialisation, no data order.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax.evaluate import metrics


def fit(features, labels, *, num_classes: int, l2: float = 1e-4, steps: int = 200):
  """Fits the probe; returns ``(weights [D, C], bias [C], mean [D], std [D], final_loss)``.

  Args:
    features: float ``[N, D]`` training features.
    labels: int ``[N]`` labels in ``[0, num_classes)``.
    l2: penalty on the weights (not the bias), per example.
    steps: L-BFGS iterations.
  """
  x = jnp.asarray(features, jnp.float32)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  x = (x - mean) / std
  y = jnp.asarray(labels)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                     value_fn=loss_fn)
      return (optax.apply_updates(params, updates), state), value
    (params, _), values = jax.lax.scan(body, (params, solver.init(params)), None, length=steps)
    return params, values[-1]

  params, final = run(params)
  return params["w"], params["b"], mean, std, float(final)


def evaluate(train_features, train_labels, test_features, test_labels, *, l2: float = 1e-4,
             steps: int = 200) -> Dict[str, float]:
  """Test ``acc1`` / ``acc5`` / ``mean_per_class_recall`` of the probe fitted on the training
  features, plus its final training objective ``train_loss``."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  w, b, mean, std, final = fit(train_features, train_labels, num_classes=num_classes, l2=l2,
                               steps=steps)
  logits = ((jnp.asarray(test_features, jnp.float32) - mean) / std) @ w + b
  out = metrics.classification_metrics(np.asarray(logits), np.asarray(test_labels))
  out["train_loss"] = final
  return out
