"""Tests for the embedded procedural "shapes" dataset."""

import re

import numpy as np
import pytest
import tensorflow as tf

from contrastive_jax.data import shapes

K = shapes.MAX_OBJECTS
KEYS = ("image", "caption", "long_caption", "num_objects", "boxes", "colours", "shapes",
        "sizes", "positions", "label", "index")


def _take(ds, n):
    """The first ``n`` elements of ``ds`` as one dict of numpy arrays."""
    return next(ds.take(n).batch(n).as_numpy_iterator())


def _examples(batch, n):
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _assert_equal_examples(a, b):
    assert set(a) == set(b) == set(KEYS)
    for k in KEYS:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module", params=[64, 32])
def batch(request):
    """96 train examples (a mix of 1-4 objects) at 64 px and 32 px."""
    return request.param, _take(shapes.dataset("train", image_size=request.param, seed=7), 96)


def test_vocabulary():
    assert len(shapes.COLOURS) == len(shapes.COLOUR_RGB) == 8
    assert len(shapes.SHAPES) == 8 and shapes.SIZES == ("small", "large")
    assert len(shapes.POSITIONS) == 9 and shapes.POSITIONS[4] == "centre"
    assert shapes.CLASS_NAMES[shapes.SHAPES.index("star") + 8 * 2] == "blue star"
    assert len(set(shapes.CLASS_NAMES)) == 64
    prompts = [t("orange circle") for t in shapes.PROMPT_TEMPLATES]
    assert "an orange circle" in prompts and "a small orange circle" in prompts
    assert all("orange circle" in p for p in prompts)
    rgb = np.array(shapes.COLOUR_RGB)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + 9 * np.eye(8)
    assert d.min() > 0.3  # well separated colours


def test_shapes_and_dtypes():
    for size in (40,):  # not a multiple of 3 (the batch fixture covers 32 and 64)
        spec = shapes.dataset("train", image_size=size).element_spec
        expected = {
            "image": ([size, size, 3], tf.uint8), "caption": ([], tf.string),
            "long_caption": ([], tf.string), "num_objects": ([], tf.int32),
            "boxes": ([K, 4], tf.float32), "colours": ([K], tf.int32),
            "shapes": ([K], tf.int32), "sizes": ([K], tf.int32),
            "positions": ([K], tf.int32), "label": ([], tf.int32), "index": ([], tf.int64),
        }
        assert set(spec) == set(expected)
        for k, (shape, dtype) in expected.items():
            assert spec[k].shape.as_list() == shape and spec[k].dtype == dtype, k
    ex = shapes.make_example(3)
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == tf.uint8
    assert ex["index"].dtype == tf.int64 and int(ex["index"]) == 3


def test_determinism_alone_vs_batched_and_sharded():
    ds = shapes.dataset("train", seed=3, num_examples=30)
    batched = list(ds.batch(7).as_numpy_iterator())
    sharded = list(ds.shard(4, 2).as_numpy_iterator())  # indices 2, 6, 10, ...
    for i in (2, 13, 26):
        alone = {k: v.numpy() for k, v in shapes.make_example(i, seed=3).items()}
        _assert_equal_examples(alone, {k: v[i % 7] for k, v in batched[i // 7].items()})
        if i % 4 == 2:
            _assert_equal_examples(alone, sharded[i // 4])
    again = {k: v.numpy() for k, v in shapes.make_example(13, seed=3).items()}
    _assert_equal_examples(again, {k: v[13 % 7] for k, v in batched[13 // 7].items()})
    # Inside a tf.function too.
    fn = tf.function(lambda i: shapes.make_example(i, seed=3), autograph=False)
    _assert_equal_examples({k: v.numpy() for k, v in fn(tf.constant(26, tf.int64)).items()},
                           {k: v[26 % 7] for k, v in batched[26 // 7].items()})


def test_seeds_and_splits_differ():
    train = _take(shapes.dataset("train"), 24)["image"]
    other_seed = _take(shapes.dataset("train", seed=1), 24)["image"]
    test = _take(shapes.dataset("test"), 24)["image"]
    for a, b in ((train, other_seed), (train, test), (other_seed, test)):
        # No example of one stream equals any example of the other.
        flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        assert not (flat_a[:, None] == flat_b[None]).all(-1).any()
    assert len({im.tobytes() for im in train}) == len(train)


def test_start_index_resumes_exactly():
    full = _take(shapes.dataset("train", seed=5, num_examples=12), 12)
    resumed = _take(shapes.dataset("train", seed=5, start_index=9), 3)  # endless train
    for j in range(3):
        _assert_equal_examples({k: v[j] for k, v in resumed.items()},
                               {k: v[9 + j] for k, v in full.items()})
    test_tail = _take(shapes.dataset("test", start_index=100, num_examples=2), 2)
    alone = shapes.make_example(101, split="test")
    _assert_equal_examples({k: v[1] for k, v in test_tail.items()},
                           {k: v.numpy() for k, v in alone.items()})


def test_split_sizes():
    assert shapes.TEST_SIZE == 4096
    assert int(shapes.dataset("test").cardinality()) == shapes.TEST_SIZE
    assert int(shapes.dataset("test", start_index=4090).cardinality()) == 6
    assert int(shapes.dataset("test", start_index=4000, num_examples=500).cardinality()) == 96
    assert int(shapes.dataset("train", num_examples=17).cardinality()) == 17
    assert shapes.dataset("train").cardinality() == tf.data.INFINITE_CARDINALITY
    last = _take(shapes.dataset("test", start_index=shapes.TEST_SIZE - 1), 5)
    assert last["index"].tolist() == [shapes.TEST_SIZE - 1]


@pytest.mark.parametrize("kwargs", [
    dict(split="validation"), dict(split="train", image_size=16),
    dict(split="train", image_size=65),
    dict(split="train", image_size=48.0), dict(split="train", min_objects=0),
    dict(split="train", max_objects=5), dict(split="train", min_objects=3, max_objects=2),
    dict(split="train", start_index=-1), dict(split="test", start_index=5000),
    dict(split="train", seed="zero"),
])
def test_bad_arguments_raise(kwargs):
    split = kwargs.pop("split")
    with pytest.raises(ValueError) as err:
        shapes.dataset(split, **kwargs)
    if split == "validation":
        assert "validation" in str(err.value) and "train" in str(err.value)
    if "start_index" not in kwargs:
        with pytest.raises(ValueError):
            shapes.make_example(0, split=split, **kwargs)


def test_object_counts_and_padding(batch):
    _, b = batch
    n = b["num_objects"]
    assert set(n.tolist()) == {1, 2, 3, 4}
    present = np.arange(K)[None] < n[:, None]
    for key, hi in (("colours", 8), ("shapes", 8), ("sizes", 2), ("positions", 9)):
        v = b[key]
        assert ((v >= 0) & (v < hi))[present].all() and (v[~present] == -1).all(), key
    assert (b["boxes"][~present] == 0).all()
    for i in range(len(n)):  # distinct grid cells
        assert len(set(b["positions"][i, : n[i]].tolist())) == n[i]
    ones = _take(shapes.dataset("train", min_objects=1, max_objects=1), 16)
    assert (ones["num_objects"] == 1).all() and (ones["label"] >= 0).all()
    fours = _take(shapes.dataset("train", min_objects=4, max_objects=4), 8)
    assert (fours["num_objects"] == 4).all() and (fours["label"] == -1).all()


def test_labels(batch):
    _, b = batch
    for ex in _examples(b, len(b["label"])):
        if ex["num_objects"] == 1:
            c, s = ex["colours"][0], ex["shapes"][0]
            assert ex["label"] == c * len(shapes.SHAPES) + s
            assert shapes.CLASS_NAMES[ex["label"]] == f"{shapes.COLOURS[c]} {shapes.SHAPES[s]}"
        else:
            assert ex["label"] == -1


def test_boxes_inside_cells_and_disjoint(batch):
    _, b = batch
    for ex in _examples(b, len(b["label"])):
        n = ex["num_objects"]
        boxes = ex["boxes"][:n]
        assert (boxes >= 0).all() and (boxes <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        for k in range(n):
            row, col = divmod(int(ex["positions"][k]), 3)
            eps = 1e-6
            assert row / 3 - eps <= boxes[k, 0] and boxes[k, 2] <= (row + 1) / 3 + eps
            assert col / 3 - eps <= boxes[k, 1] and boxes[k, 3] <= (col + 1) / 3 + eps
            for j in range(k):
                overlap_y = min(boxes[k, 2], boxes[j, 2]) - max(boxes[k, 0], boxes[j, 0])
                overlap_x = min(boxes[k, 3], boxes[j, 3]) - max(boxes[k, 1], boxes[j, 1])
                assert overlap_y <= 0 or overlap_x <= 0


def test_captions_mention_every_object(batch):
    _, b = batch
    for ex in _examples(b, len(b["label"])):
        n = ex["num_objects"]
        caption, long_caption = ex["caption"].decode(), ex["long_caption"].decode()
        assert len(caption) <= 100
        sentences = [s for s in long_caption.split(".") if s.strip()]
        assert long_caption.endswith(".") and len(sentences) == n + 1
        for k in range(n):
            colour = shapes.COLOURS[ex["colours"][k]]
            shape = shapes.SHAPES[ex["shapes"][k]]
            assert re.search(rf"\b{colour} {shape}\b", caption), (caption, colour, shape)
            sentence = sentences[k]
            for word in (colour, shape, shapes.SIZES[ex["sizes"][k]],
                         shapes.POSITIONS[ex["positions"][k]]):
                assert re.search(rf"\b{word}\b", sentence), (sentence, word)
        if n == 1:
            position = shapes.POSITIONS[ex["positions"][0]]
            assert caption.startswith("a") and caption.count(" a ") == 0
            assert (position in caption) or not re.search("top|bottom|left|right|centre", caption)
        assert re.search(r"\b(one|two|three|four) objects?\b", sentences[-1])


def test_rendered_colours_and_dark_background(batch):
    size, b = batch
    rgb = np.array(shapes.COLOUR_RGB)
    for ex in _examples(b, len(b["label"])):
        image = ex["image"].astype(np.float32) / 255.0
        background = np.ones((size, size), bool)
        for k in range(ex["num_objects"]):
            y0, x0, y1, x1 = ex["boxes"][k] * size
            # Central 70% of the box, only clearly lit pixels (the ring has a hole).
            cy, cx, hy, hx = (y0 + y1) / 2, (x0 + x1) / 2, 0.35 * (y1 - y0), 0.35 * (x1 - x0)
            ys, xs = np.arange(size)[:, None] + 0.5, np.arange(size)[None, :] + 0.5
            region = (np.abs(ys - cy) <= hy) & (np.abs(xs - cx) <= hx)
            lit = region & (image.max(-1) > 0.5)
            assert lit.sum() >= 2, (ex["caption"], k)
            mean = image[lit].mean(0)
            nearest = np.argmin(np.linalg.norm(rgb - mean, axis=-1))
            assert nearest == ex["colours"][k], (ex["caption"], k, mean)
            grow = 1.0  # antialiasing rim
            background &= ~((ys >= y0 - grow) & (ys <= y1 + grow) & (xs >= x0 - grow)
                            & (xs <= x1 + grow))
        assert image[background].max() <= 0.3 + 1 / 255
        assert image[background].std() > 0.005  # textured, not constant


def test_background_varies_between_images():
    b = _take(shapes.dataset("test", min_objects=1, max_objects=1), 8)
    # Objects cover a minority of pixels: the median is a background value.
    median = np.median(b["image"].reshape(8, -1, 3), axis=1)  # [8, 3]
    assert np.ptp(median, axis=0).max() > 10
