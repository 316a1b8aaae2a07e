"""Evaluation metrics on hand-made inputs, and the evaluate CLI on a trained checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import REPO, TINY_STEPS, run_module
from contrastive_jax import train
from contrastive_jax.evaluate import metrics


def test_classification_metrics_by_hand():
  logits = np.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0, top1 hit
      [0.0, 0.2, 0.9, 0.1, 0.0, 0.0],   # label 1, rank 2 -> top5 hit
      [0.0, 0.0, 0.1, 0.9, 0.0, 0.0],   # label 2, rank 2
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 0, rank 6 -> miss even at 5
  ])
  labels = np.array([0, 1, 2, 0])
  out = metrics.classification_metrics(logits, labels)
  assert out["acc1"] == pytest.approx(0.25)
  assert out["acc5"] == pytest.approx(0.75)
  # Per-class recall: class 0 -> 1/2, class 1 -> 0, class 2 -> 0; mean over present classes.
  assert out["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)
  assert "acc5" not in metrics.classification_metrics(logits[:, :4], labels)


def test_retrieval_recall_with_multiple_positives_by_hand():
  image = np.eye(3, dtype=np.float32)
  text = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 1, 0]], np.float32)
  positives = np.array([[1, 0, 0, 0],   # image 0 <- text 0
                        [0, 1, 0, 1],   # image 1 <- texts 1 and 3
                        [0, 0, 1, 0]], bool)
  out = metrics.retrieval_metrics(image, text, positives, ks=(1, 2))
  # image->text: img0 top1=t0 hit; img1 top1=t3 hit; img2 top1=t2 hit.
  assert out["i2t_recall@1"] == pytest.approx(1.0)
  # text->image: t0->img0 hit; t1 (0.6, 0.8) -> img1 hit; t2->img2 hit; t3->img1 hit.
  assert out["t2i_recall@1"] == pytest.approx(1.0)
  text[1] = [0.8, 0.6, 0]  # now t1's best image is img0 (a miss at 1, a hit at 2)
  out = metrics.retrieval_metrics(image, text, positives, ks=(1, 2))
  assert out["t2i_recall@1"] == pytest.approx(0.75) and out["t2i_recall@2"] == 1.0
  assert out["i2t_recall@1"] == pytest.approx(1.0)  # img1 still finds t3 first
  with pytest.raises(ValueError, match="positive"):
    metrics.recall_at_k(np.zeros((2, 2)), np.zeros((2, 2), bool), (1,))


def test_evaluate_cli_reproduces_the_training_numbers(tiny_run, tmp_path):
  config, workdir, results = tiny_run
  output = tmp_path / "metrics.json"
  proc = run_module(["contrastive_jax.evaluate",
                     f"--config={REPO}/configs/clip_shapes.py:size=tiny,steps={TINY_STEPS}",
                     f"--workdir={workdir}", f"--output={output}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = json.loads(output.read_text())
  assert written["step"] == TINY_STEPS
  for key, value in results.items():
    assert written[key] == pytest.approx(value, abs=1e-6), key
  assert '"zeroshot/shapes/acc1"' in proc.stdout


def test_late_interaction_scores_in_chunks_equal_one_block(monkeypatch):
  import jax
  from contrastive_jax.evaluate import late_interaction
  from contrastive_jax.losses.filip import late_interaction_scores
  rng = np.random.default_rng(0)
  q = rng.normal(size=(7, 3, 4)).astype(np.float32)
  k = rng.normal(size=(5, 6, 4)).astype(np.float32)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  qmask = rng.random((7, 3)) < 0.7
  kmask = rng.random((5, 6)) < 0.6
  qmask[:, 0] = kmask[:, 0] = True
  q, k = q * qmask[..., None], k * kmask[..., None]
  want = np.asarray(jax.jit(late_interaction_scores)(q, qmask, k, kmask))
  monkeypatch.setattr(late_interaction, "MAX_BLOCK_FLOATS", 2 * 3 * 6)  # 2 keys, 1 query
  got = late_interaction.scores(q, qmask, k, kmask)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The text-side mean counts each valid query token once: duplicating a padded slot's
  # neighbour into it (now valid) changes the score, padding does not.
  np.testing.assert_allclose(late_interaction.scores(q, qmask, np.concatenate(
      [k, np.full((5, 2, 4), 9.0, np.float32)], 1), np.concatenate(
          [kmask, np.zeros((5, 2), bool)], 1)), want, rtol=1e-6)


def test_retrieval_from_scores_matches_embeddings():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(6, 3))
  text = rng.normal(size=(6, 3))
  positives = np.eye(6, dtype=bool)
  a = metrics.retrieval_metrics(image, text, positives, ks=(1, 2))
  b = metrics.retrieval_metrics_from_scores(image @ text.T, text @ image.T, positives, ks=(1, 2))
  assert a == b
  # i2t and t2i scores are used independently: flipping the t2i scores changes only t2i.
  c = metrics.retrieval_metrics_from_scores(image @ text.T, -(text @ image.T), positives,
                                            ks=(1, 2))
  assert c["i2t_recall@1"] == a["i2t_recall@1"]
  assert c["t2i_recall@1"] != a["t2i_recall@1"]


def test_unknown_scoring_names_the_key():
  from conftest import tiny_config
  from contrastive_jax import evaluate
  config = tiny_config()
  config.eval.scoring = "maxsim"
  with pytest.raises(ValueError, match="config.eval.scoring"):
    evaluate.run_evaluators(config, None, None, None, None)


def test_weighted_knn_by_hand():
  from contrastive_jax.evaluate import knn
  bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
  labels = np.array([0, 1, 1, 2])
  query = np.array([[2.0, 0.2]])  # cosines: 0.995, 0.855, 0.0995, -0.995
  cos = (bank @ query[0]) / np.linalg.norm(query[0])
  # k = 1: the nearest neighbour's label, whatever the temperature.
  np.testing.assert_array_equal(np.argmax(knn.knn_logits(query, bank, labels, num_classes=3,
                                                         k=1), axis=1), [0])
  # k = 3: class votes are sums of exp(cos / T) over the three nearest.
  scores = knn.knn_logits(query, bank, labels, num_classes=3, k=3, temperature=1.0)
  expected = [np.exp(cos[0]), np.exp(cos[1]) + np.exp(cos[2]), 0.0]
  np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
  assert np.argmax(scores[0]) == 1  # two weaker neighbours outvote the nearest one
  # Chunking does not change the answer.
  many = np.random.RandomState(0).normal(size=(37, 2))
  np.testing.assert_allclose(knn.knn_logits(many, bank, labels, num_classes=3, k=2, chunk=8),
                             knn.knn_logits(many, bank, labels, num_classes=3, k=2), rtol=1e-6)


def test_linear_probe_separates_separable_classes_and_l2_shrinks_it():
  from contrastive_jax.evaluate import linear_probe
  rng = np.random.RandomState(0)
  centres = rng.normal(size=(4, 16)) * 3
  labels = rng.randint(0, 4, size=400)
  features = centres[labels] + rng.normal(size=(400, 16))
  out = linear_probe.evaluate(features[:300], labels[:300], features[300:], labels[300:],
                              l2=1e-4, steps=100)
  assert out["acc1"] == 1.0 and out["train_loss"] < 0.05
  w_small = linear_probe.fit(features, labels, num_classes=4, l2=1e-4, steps=100)[0]
  w_big = linear_probe.fit(features, labels, num_classes=4, l2=1.0, steps=100)[0]
  assert np.linalg.norm(w_big) < 0.5 * np.linalg.norm(w_small)


def test_image_only_evaluators_read_the_training_source():
  from conftest import tiny_config
  from contrastive_jax import evaluate
  config = tiny_config("simclr_shapes")
  config.eval.evaluators.knn.dataset = "fashion_mnist"
  with pytest.raises(ValueError, match="evaluators.knn.dataset='fashion_mnist'"):
    evaluate.run_evaluators(config, None, None, None, None)


def test_checkpoint_encoders_for_external_harnesses(tiny_run):
  from contrastive_jax.evaluate import external
  config, workdir, _ = tiny_run
  encode_image, encode_text = external.checkpoint_encoders(
      config, os.path.join(workdir, "checkpoints"))
  tokenizer, objective, _, variables, _ = train.restore_variables(
      config, os.path.join(workdir, "checkpoints"))
  size = config.data.image_size
  images = np.random.default_rng(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  want = objective.model.apply(jax.device_get(variables), images,
                               method=objective.model.encode_image)[0]
  np.testing.assert_allclose(encode_image(images), want, rtol=1e-5, atol=1e-6)
  tokens, mask = tokenizer.tokenize(["a red circle", "a blue star"])
  want = objective.model.apply(jax.device_get(variables), tokens.numpy(), mask.numpy(),
                               method=objective.model.encode_text)[0]
  got = encode_text(["a red circle", "a blue star"])
  assert got.shape == (2, config.model.embed_dim)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
