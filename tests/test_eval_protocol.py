"""CLIP_benchmark protocol pieces on hand-made features: metrics (ties, absent classes), prompts,
linear-probe regularisation search, few-shot prototypes, GDA closed form, result files."""

import json

import numpy as np
import pytest

from contrastive_jax.evaluate import fewshot, gda, linear_probe, metrics, prompts, results

# --- metrics -------------------------------------------------------------------------------


def test_classification_ties_rank_the_lower_class_first():
  logits = np.zeros((4, 6))          # every class tied
  labels = np.array([0, 4, 5, 1])
  out = metrics.classification_metrics(logits, labels)
  assert out["acc1"] == 0.25         # the tie predicts class 0: only the label-0 row is a hit
  assert out["acc5"] == 0.75         # top-5 of a full tie is classes 0..4: label 5 misses
  # Per-class recall: class 0 -> 1, classes 1, 4, 5 -> 0 (class 0 is predicted for all rows).
  assert out["mean_per_class_recall"] == pytest.approx(1 / 4)
  logits[2, 5] = 1e-3                # break one tie
  assert metrics.classification_metrics(logits, labels)["acc1"] == 0.5


def test_mean_per_class_recall_ignores_classes_without_test_examples():
  # sklearn.metrics.balanced_accuracy_score([0, 0, 1, 3], [0, 2, 1, 1]) == 0.5: class 2 is
  # predicted but absent from the labels and is dropped; 0 -> 1/2, 1 -> 1, 3 -> 0.
  pred = np.array([0, 2, 1, 1])
  logits = np.eye(4)[pred]
  out = metrics.classification_metrics(logits, np.array([0, 0, 1, 3]))
  assert out["mean_per_class_recall"] == pytest.approx(0.5)
  assert out["acc1"] == pytest.approx(0.5)


def test_acc5_only_with_at_least_five_classes():
  logits = np.random.RandomState(0).normal(size=(8, 6))
  labels = np.arange(8) % 4
  assert "acc5" in metrics.classification_metrics(logits, labels)
  assert "acc5" not in metrics.classification_metrics(logits, labels, num_classes=4)
  assert "acc5" not in metrics.classification_metrics(logits[:, :4], labels)
  with pytest.raises(ValueError, match="labels"):
    metrics.classification_metrics(logits[:, :3], labels)
  with pytest.raises(ValueError, match="exceeds"):
    metrics.classification_metrics(logits[:, :4], labels, num_classes=5)


def test_recall_at_k_ties_rank_by_candidate_index_and_any_caption_counts():
  scores = np.zeros((3, 4))                      # all candidates tied
  positives = np.array([[1, 0, 0, 0],            # positive first: found at 1
                        [0, 0, 1, 0],            # positive third: found at 3
                        [0, 1, 0, 1]], bool)     # two captions: the second candidate counts
  out = metrics.recall_at_k(scores, positives, (1, 2, 3))
  assert out == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
  scores[1, 2] = 1.0
  assert metrics.recall_at_k(scores, positives, (1,))[1] == pytest.approx(2 / 3)


# --- prompts -------------------------------------------------------------------------------

EXPECTED_COUNTS = {  # (classes, templates)
    "imagenet2012": (1000, 80), "cifar10": (10, 18), "cifar100": (100, 18), "stl10": (10, 2),
    "food101": (101, 1), "oxford_iiit_pet": (37, 1), "oxford_flowers102": (102, 1),
    "caltech101": (102, 34), "dtd": (47, 8), "eurosat": (10, 3), "svhn_cropped": (10, 6),
    "sun397": (397, 2), "cars196": (196, 8), "mnist": (10, 1), "patch_camelyon": (2, 2),
    "diabetic_retinopathy_detection": (5, 1)}


def test_prompt_files_load_with_counts_and_sources():
  assert prompts.available() == sorted(EXPECTED_COUNTS)
  for name, (num_classes, num_templates) in EXPECTED_COUNTS.items():
    names, templates = prompts.load(name)
    assert (len(names), len(templates)) == (num_classes, num_templates), name
    assert all(t.count("{}") == 1 and "{c}" not in t for t in templates), name
    rec = prompts.record(name)
    assert rec["source"]["repository"] == "LAION-AI/CLIP_benchmark"
    assert "@" in rec["source"]["templates"] and rec["label_order"], name
  names, templates = prompts.load("imagenet2012")
  assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
  assert templates[0].format(names[0]) == "a bad photo of a tench."
  assert prompts.load("cifar10")[0][:3] == ["airplane", "automobile", "bird"]
  assert prompts.load("eurosat/rgb:2.0.0") == prompts.load("eurosat")
  assert prompts.load("imagenet1k") == prompts.load("imagenet2012")  # CLIP_benchmark alias
  with pytest.raises(KeyError, match="available"):
    prompts.load("no_such_dataset")


def test_prompt_class_order_matches_tfds_labels(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  def tfds_names(name):
    return tfds.builder(name, data_dir=str(tmp_path)).info.features["label"].names

  assert prompts.load("food101")[0] == [n.replace("_", " ") for n in tfds_names("food101")]
  assert prompts.load("food101")[0][16:18] == ["cheesecake", "cheese plate"]  # TFDS, not torch
  assert prompts.load("dtd")[0] == tfds_names("dtd")
  assert prompts.load("cars196")[0] == tfds_names("cars196")
  assert prompts.load("sun397")[0] == [n[3:].replace("_", " ").replace("/", " ")
                                       for n in tfds_names("sun397")]
  pets = [n.replace("_", " ").lower() for n in tfds_names("oxford_iiit_pet")]
  assert [n.lower() for n in prompts.load("oxford_iiit_pet")[0]] == pets
  flowers = tfds_names("oxford_flowers102")
  differ = [i for i, (a, b) in enumerate(zip(flowers, prompts.load("oxford_flowers102")[0]))
            if a != b]
  assert differ == [15, 59, 92]  # CLIP's curated names; same order
  caltech = tfds_names("caltech101")
  ours = prompts.load("caltech101")[0]
  assert (caltech[4], ours[4]) == ("background_google", "background")
  assert (caltech[37:39], ours[37:39]) == (["faces", "faces_easy"],
                                           ["off-center face", "centered face"])
  assert len(tfds_names("eurosat/rgb")) == len(prompts.load("eurosat")[0])


# --- linear probe --------------------------------------------------------------------------


def test_grid_search_finds_the_peak_with_few_evaluations_and_prefers_lower_on_ties():
  best, scores = linear_probe.search_grid(lambda i: -abs(i - 37), 97, 7)
  assert best == 37 and len(scores) <= 15
  assert sorted(scores) == [0, 16, 24, 32, 34, 35, 36, 37, 38, 40, 44, 48, 64, 80, 96]
  best, _ = linear_probe.search_grid(lambda i: 1.0, 97, 7)
  assert best == 0                                  # all tied: the smallest penalty
  best, _ = linear_probe.search_grid(lambda i: float(i >= 90), 97, 7)
  assert best == 90                                 # a plateau: its lowest index


def test_linear_probe_chooses_strong_l2_on_noise_and_weak_on_separable_data():
  rng = np.random.RandomState(0)
  # Pure-noise features, 3:1 labels: fitting the noise loses to predicting the majority class,
  # which needs a large penalty (weights -> 0); the search must find one.
  y = (rng.rand(200) < 0.25).astype(int)
  x = rng.normal(size=(200, 32))
  yt = (rng.rand(100) < 0.25).astype(int)
  xt = rng.normal(size=(100, 32))
  out = linear_probe.evaluate(x, y, xt, yt, val_fraction=0.5, steps=40, seed=0)
  va = np.random.default_rng(0).permutation(200)[:100]   # the held-out part (seed 0)
  tr = np.setdiff1d(np.arange(200), va)
  majority = max(np.mean(y[va] == 0), np.mean(y[va] == 1))

  def val_acc(l2):
    params = linear_probe.fit(x[tr], y[tr], num_classes=2, l2=l2, steps=40)
    return np.mean(np.argmax(linear_probe.predict(x[va], *params[:4]), 1) == y[va])

  assert out["l2"] >= 1e-2 and out["val_acc1"] >= majority
  assert val_acc(out["l2"]) == pytest.approx(out["val_acc1"])   # the reported choice
  assert val_acc(1e-6) < majority                              # the search mattered
  # Separable clusters: every penalty up to some size is perfect; ties go to the smallest.
  # (Same shapes as above -- 100/200 x 32, 2 classes, 40 steps -- so nothing recompiles.)
  centres = rng.normal(size=(2, 32)) * 3
  lab = rng.randint(0, 2, size=300)
  feats = centres[lab] + rng.normal(size=(300, 32))
  out = linear_probe.evaluate(feats[:200], lab[:200], feats[200:], lab[200:], val_fraction=0.5,
                              steps=40)
  assert out["l2"] == linear_probe.L2_GRID[0] and out["val_acc1"] == 1.0 and out["acc1"] == 1.0
  # An explicit validation split (CLIP_benchmark's val_split) instead of a carved one.
  tr, va = np.arange(100, 200), np.arange(100)
  explicit = linear_probe.evaluate(feats[tr], lab[tr], feats[200:], lab[200:], steps=40,
                                   val_features=feats[va], val_labels=lab[va])
  assert explicit["l2"] == linear_probe.L2_GRID[0] and explicit["acc1"] == 1.0
  with pytest.raises(ValueError, match="either"):
    linear_probe.evaluate(feats[tr], lab[tr], feats[200:], lab[200:], val_fraction=0.2,
                          val_features=feats[va], val_labels=lab[va])


def test_linear_probe_normalize_makes_it_invariant_to_feature_norms():
  rng = np.random.RandomState(1)
  x = rng.normal(size=(300, 32))
  y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
  scaled = x * rng.uniform(0.5, 3.0, size=(300, 1))
  kw = dict(steps=40, normalize=True, standardize=False)
  a = linear_probe.evaluate(x[:200], y[:200], x[200:], y[200:], **kw)
  b = linear_probe.evaluate(scaled[:200], y[:200], scaled[200:], y[200:], **kw)
  assert a["acc1"] == b["acc1"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
  assert a["acc1"] > 0.9 and a["l2"] == 1e-4 and "val_acc1" not in a
  _, _, mean, std, _ = linear_probe.fit(x[:200], y[:200], num_classes=2, steps=40,
                                        standardize=False)
  assert np.all(np.asarray(mean) == 0) and np.all(np.asarray(std) == 1)


# --- few-shot ------------------------------------------------------------------------------


def test_fewshot_sampling_is_deterministic_balanced_and_nested():
  labels = np.repeat(np.arange(5), 7)
  a = fewshot.sample(labels, 3, seed=4)
  assert np.array_equal(a, fewshot.sample(labels, 3, seed=4))
  assert not np.array_equal(a, fewshot.sample(labels, 3, seed=5))
  assert np.array_equal(np.bincount(labels[a]), [3] * 5) and len(set(a.tolist())) == 15
  assert set(a.tolist()) <= set(fewshot.sample(labels, 4, seed=4).tolist())
  assert len(fewshot.sample(labels, -1, seed=0)) == 35
  with pytest.raises(ValueError, match="Insufficient"):
    fewshot.sample(labels, 8, seed=0)


def test_fewshot_prototypes_by_hand_and_on_separable_data():
  feats = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
  protos, present = fewshot.prototypes(feats, np.array([0, 0, 1]), num_classes=3)
  s = np.sqrt(0.5)
  np.testing.assert_allclose(protos, [[(1 + s) / np.hypot(1 + s, s), s / np.hypot(1 + s, s)],
                                      [0, 1], [0, 0]], atol=1e-12)
  assert present.tolist() == [True, True, False]
  logit = fewshot.logits(np.array([[3.0, 4.0]]), protos, present)
  np.testing.assert_allclose(logit[0, :2], protos[:2] @ [0.6, 0.8])
  assert logit[0, 2] == -np.inf
  rng = np.random.RandomState(0)
  centres = rng.normal(size=(6, 12))
  train_y, test_y = np.repeat(np.arange(6), 20), np.repeat(np.arange(6), 5)
  train_x = centres[train_y] + 0.1 * rng.normal(size=(120, 12))
  test_x = centres[test_y] + 0.1 * rng.normal(size=(30, 12))
  out = fewshot.evaluate(train_x, train_y, test_x, test_y, shots=2, seed=0)
  assert out["acc1"] == 1.0 and out["mean_per_class_recall"] == 1.0 and out["shots"] == 2
  assert out == fewshot.evaluate(train_x, train_y, test_x, test_y, shots=2, seed=0)


# --- GDA -----------------------------------------------------------------------------------


def test_gda_closed_form_two_classes():
  feats = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
  labels = np.array([0, 0, 1, 1])
  # mu = (+-1, 0); Z^T Z = diag(0, 4); tr(Sigma) = 4/3 -> Sigma^-1 = 2 pinv(diag(4/3, 16/3)).
  w, b = gda.gda_fit(feats, labels, normalize=False)
  np.testing.assert_allclose(w, [[1.5, -1.5], [0.0, 0.0]], atol=1e-12)
  np.testing.assert_allclose(b, np.log(0.5) - 0.75, atol=1e-12)
  # No ridge: pinv(diag(0, 4)) keeps only the y direction, orthogonal to both means: W = 0.
  w0, b0 = gda.gda_fit(feats, labels, normalize=False, shrink=0.0)
  np.testing.assert_allclose(w0, 0.0, atol=1e-12)
  np.testing.assert_allclose(b0, np.log(0.5), atol=1e-12)
  unit = feats / np.sqrt(2)
  np.testing.assert_allclose(gda.gda_fit(unit, labels)[0],
                             gda.gda_fit(unit, labels, normalize=False)[0], atol=1e-12)
  np.testing.assert_allclose(gda.gda_logits(np.array([[2.0, 0.0]]), w, b),
                             [[1.5 + np.log(0.5) - 0.75, -1.5 + np.log(0.5) - 0.75]])
  # Random support set against a literal transcription of the reference estimator.
  rng = np.random.RandomState(3)
  x = rng.normal(size=(30, 6))
  y = np.arange(30) % 3
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  mus = np.stack([xn[y == c].mean(0) for c in range(3)])
  cov = np.cov((xn - mus[y]).T)                   # like torch's center_vecs.T.cov()
  prec = 6 * np.linalg.pinv(29 * cov + np.trace(cov) * np.eye(6))
  w, b = gda.gda_fit(x, y)
  np.testing.assert_allclose(w, prec @ mus.T, rtol=1e-10)
  np.testing.assert_allclose(b, np.log(1 / 3) - 0.5 * np.einsum("nd,dc,nc->n", mus, prec, mus),
                             rtol=1e-10)


def test_gda_zero_covariance_and_alpha_zero_reduce_to_zero_shot():
  rng = np.random.RandomState(0)
  text = rng.normal(size=(3, 8))
  support = rng.normal(size=(3, 8))
  w, b = gda.gda_fit(support, np.arange(3))       # one shot per class: Sigma = 0, pinv(0) = 0
  assert np.all(np.isfinite(w)) and np.all(w == 0)
  np.testing.assert_allclose(b, np.log(1 / 3))
  test = rng.normal(size=(20, 8))
  zs = gda.zeroshot_logits(test, text)
  for alpha in (0.0, 1.0, 100.0):
    mixed = gda.ensemble(zs, gda.gda_logits(test, w, b), alpha)
    assert np.array_equal(np.argmax(mixed, 1), np.argmax(zs, 1))
  support = np.concatenate([support, support + 0.3 * rng.normal(size=(3, 8))])
  w, b = gda.gda_fit(support, np.tile(np.arange(3), 2))
  assert np.any(w != 0)
  np.testing.assert_array_equal(gda.ensemble(zs, gda.gda_logits(test, w, b), 0.0), zs)
  y = rng.randint(0, 3, size=20)
  out = gda.evaluate(support, np.tile(np.arange(3), 2), test, y, test, y, text, alphas=(0.0,))
  assert out["acc1"] == out["zeroshot_acc1"] and out["alpha"] == 0.0


def test_gda_alpha_selection_and_few_shot_gain():
  zs = np.array([[1.0, 0.0], [1.0, 0.0]])
  g = np.array([[0.0, 0.02], [0.0, 2.0]])
  labels = np.array([1, 1])
  # alpha 1e-4..0.01: acc 0; 0.1..10: 1/2 (first: 1.0); 100: 1 -> strict improvement picks 100.
  assert gda.select_alpha(zs, g, labels) == (100.0, 1.0)
  assert gda.select_alpha(zs, g, labels, alphas=(1.0, 10.0)) == (1.0, 0.5)
  assert gda.select_alpha(zs, g, np.array([5, 5])) == (0.1, 0.0)  # nothing beats acc 0
  rng = np.random.RandomState(1)
  centres = rng.normal(size=(4, 16))
  text = rng.normal(size=(4, 16))                  # an uninformative zero-shot classifier
  sy, vy, ty = np.repeat(np.arange(4), 8), np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 10)
  sx = centres[sy] + 0.2 * rng.normal(size=(32, 16))
  vx = centres[vy] + 0.2 * rng.normal(size=(20, 16))
  tx = centres[ty] + 0.2 * rng.normal(size=(40, 16))
  out = gda.evaluate(sx, sy, vx, vy, tx, ty, text)
  assert out["acc1"] == 1.0 and out["zeroshot_acc1"] < 0.7 and out["alpha"] >= 1.0


# --- results -------------------------------------------------------------------------------


def test_write_result_round_trip_and_combined_table(tmp_path):
  out = str(tmp_path / "res")
  p = results.write_result(out, "m/a", "cifar10", "zeroshot_classification",
                           {"acc1": np.float32(0.5), "acc5": float("nan"), "n": np.int64(3)},
                           metadata={"split": "test"})
  rec = json.loads(open(p).read())
  assert rec["metrics"] == {"acc1": 0.5, "acc5": None, "n": 3}
  assert rec["metadata"]["split"] == "test" and "created" in rec["metadata"]
  assert (rec["model"], rec["dataset"], rec["task"]) == ("m/a", "cifar10",
                                                          "zeroshot_classification")
  # Same triple overwrites; a model whose slug collides ("m_a") gets its own file.
  results.write_result(out, "m/a", "cifar10", "zeroshot_classification", {"acc1": 0.25})
  results.write_result(out, "m_a", "cifar10", "zeroshot_classification", {"acc1": 0.75})
  results.write_result(out, "m/a", "stl10", "zeroshot_classification", {"acc1": 0.5})
  results.write_result(out, "m_a", "stl10", "linear_probe", {"acc1": 1.0, "l2": 0.1})
  assert len(results.load_results(out)) == 4
  assert results.combined_table(out) == (
      "| dataset | task | metric | m/a | m_a |\n"
      "|---|---|---|---:|---:|\n"
      "| cifar10 | zeroshot_classification | acc1 | 25.00 | 75.00 |\n"
      "| stl10 | linear_probe | acc1 | - | 100.00 |\n"
      "| stl10 | zeroshot_classification | acc1 | 50.00 | - |\n"
      "| average | 1 rows | | 25.00 | 75.00 |\n")


def test_feature_cache_round_trip_keys_and_compute_once(tmp_path):
  cache = results.FeatureCache(str(tmp_path / "features"))
  assert cache.get("m", "cifar10", "test", 100) is None
  calls = []

  def compute():
    calls.append(1)
    return np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 1, 1])

  f1, l1 = cache.get_or_compute("m", "cifar10", "test", 100, compute)
  f2, l2 = cache.get_or_compute("m", "cifar10", "test", 100, compute)
  assert len(calls) == 1 and np.array_equal(f1, f2) and np.array_equal(l2, [0, 1, 1])
  assert cache.get("m", "cifar10", "test", None) is None      # n is part of the key
  assert cache.get("m", "cifar10", "train", 100) is None
  cache.put("m/x", "coco", "test", None, np.ones((2, 3)))
  feats, labels = cache.get("m/x", "coco", "test")
  assert labels is None and feats.shape == (2, 3)
  assert cache.get("m_x", "coco", "test") is None
