"""The embedded "shapes" dataset: procedurally generated image/caption pairs.

Every example is a small RGB scene (default 64x64 px) holding 1-4 coloured
objects on a dark, randomly textured background, together with a short
caption, a long multi-sentence caption and structured annotations.  Nothing is
read from disk: scenes are drawn with TensorFlow ops inside ``tf.data`` and all
randomness comes from stateless random ops whose seeds are derived from
``(seed, split stream, index)``.  Example ``i`` of a split is therefore
bitwise identical however the dataset is sharded, batched, parallelised or
resumed, and the train and test splits use different random streams.

Scene model
    The image is divided into a 3x3 grid of cells (``POSITIONS``).  The
    ``n`` objects occupy ``n`` distinct cells (a random permutation, first
    ``n`` taken) and are jittered inside their cell without ever leaving it,
    so objects never overlap.  Each object is a ``SHAPES`` entry rendered as
    an antialiased implicit function of ``(dx, dy) / radius``, with one of the
    8 ``COLOURS`` (small per-object jitter of ``COLOUR_RGB`` plus pixel noise)
    and one of two ``SIZES`` whose radius ranges do not overlap.  The
    background is dark (values <= 0.3): a random base colour, a sinusoidal
    stripe pattern, a linear gradient and pixel noise, all random per image.

Text
    ``caption`` is short, e.g. ``"a large red circle at the top left"`` or
    ``"a red circle, a blue square and a green star"``; ``long_caption`` has one
    sentence per object plus a scene sentence, each ending in ``'.'``, e.g.
    ``"A large red circle is at the top left. A small blue star is at the
    bottom. The scene has two objects on a dark textured background."``.
    Single-object scenes get a class label over ``CLASS_NAMES``
    (``colour * len(SHAPES) + shape``); ``PROMPT_TEMPLATES`` turn class names
    into zero-shot prompts.
"""

from __future__ import annotations

import functools
import math
import operator

import tensorflow as tf

__all__ = [
    "CLASS_NAMES", "COLOURS", "COLOUR_RGB", "MAX_OBJECTS", "POSITIONS",
    "POSITION_PHRASES", "PROMPT_TEMPLATES", "REGRESSION_TARGETS", "SHAPES", "SIZES", "SPLITS",
    "TEST_SIZE", "dataset", "example_fn", "make_example", "regression_target",
]

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white")
COLOUR_RGB = (
    (0.95, 0.12, 0.12),  # red
    (0.12, 0.80, 0.18),  # green
    (0.18, 0.35, 1.00),  # blue
    (0.95, 0.92, 0.12),  # yellow
    (0.12, 0.90, 0.95),  # cyan
    (0.92, 0.18, 0.92),  # magenta
    (1.00, 0.55, 0.05),  # orange
    (0.96, 0.96, 0.96),  # white
)
SHAPES = ("circle", "square", "triangle", "diamond", "plus", "ring", "star", "semicircle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
# How each cell is referred to in captions; each phrase contains its position word.
POSITION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left",
                    "in the centre", "on the right", "at the bottom left", "at the bottom",
                    "at the bottom right")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article, as captions write it ("an orange star")."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


# Zero-shot prompts, written in the captions' own language (a byte-level text tower trained
# only on shapes captions has never seen "a photo of"): callables ``class name -> prompt``,
# as open_clip's templates are, so the article agrees with the colour ("an orange circle").
# Ensembling over sizes and positions makes the classifier invariant to both.
PROMPT_TEMPLATES = (
    lambda c: _a(c),
    lambda c: _a(f"small {c}"),
    lambda c: _a(f"large {c}"),
    lambda c: _a(f"{c} in the centre"),
    lambda c: _a(f"{c} at the top left"),
    lambda c: _a(f"{c} at the bottom right"),
)
MAX_OBJECTS = 4
TEST_SIZE = 4096
REGRESSION_TARGETS = ("size", "x", "y")
SPLITS = ("train", "test")

# Random stream per split: the second word of the base stateless seed.
_STREAMS = {"train": 0x5EED_0001, "test": 0x5EED_7E57}
_ALG = "philox"  # fixed, so streams do not depend on the device
_NUM_WORDS = ("zero", "one", "two", "three", "four")

# Radius of an object as a fraction of the cell side, per size (non-overlapping).
_RADIUS_RANGES = ((0.31, 0.36), (0.40, 0.46))
_COLOUR_JITTER = 0.05  # per-channel uniform jitter of the base RGB
_OBJECT_NOISE = 0.04  # amplitude of the uniform pixel noise on objects
_BG_MAX = 0.3

# Shape geometry, in units of the object radius (y points down).
_TRI_R = 1.15  # circumradius of the triangle (its box is centred on the object)
_STAR_INNER = 0.45
_PLUS_ARM = 0.32
_RING_MID, _RING_HALF = 0.7, 0.3
# Tight bounding box (ymin, xmin, ymax, xmax) of each shape, radius units.
_SHAPE_EXTENTS = (
    (-1.0, -1.0, 1.0, 1.0),                         # circle
    (-0.8, -0.8, 0.8, 0.8),                         # square
    (-0.75 * _TRI_R, -0.866 * _TRI_R, 0.75 * _TRI_R, 0.866 * _TRI_R),  # triangle
    (-1.0, -1.0, 1.0, 1.0),                         # diamond
    (-1.0, -1.0, 1.0, 1.0),                         # plus
    (-1.0, -1.0, 1.0, 1.0),                         # ring
    (-1.0, -math.sin(0.4 * math.pi), -math.cos(0.8 * math.pi), math.sin(0.4 * math.pi)),  # star
    (-0.5, -1.0, 0.5, 1.0),                         # semicircle
)


def _shape_distances(u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """Signed distance-like fields of all shapes (negative inside), radius units.

    Args:
      u, v: float32 offsets ``(dx, dy) / radius`` of pixel centres from the
        object centres, shaped ``[K, 1, W]`` and ``[K, W, 1]`` (``v`` grows
        downwards).

    Returns:
      float32 ``[K, len(SHAPES), W, W]``.
    """
    au, av = tf.abs(u), tf.abs(v)
    rho = tf.sqrt(u * u + v * v)
    up = -v  # y pointing up
    circle = rho - 1.0
    square = tf.maximum(au, av) - 0.8
    w = up + 0.25 * _TRI_R  # centre the triangle's box on the object
    triangle = tf.maximum(-w - 0.5 * _TRI_R, 0.8660254 * au + 0.5 * w - 0.5 * _TRI_R)
    diamond = (au + av - 1.0) * 0.70710678
    plus = tf.minimum(tf.maximum(au - 1.0, av - _PLUS_ARM), tf.maximum(au - _PLUS_ARM, av - 1.0))
    ring = tf.abs(rho - _RING_MID) - _RING_HALF
    # Star: fold the plane into the sector [0, pi/5] (angle from the up axis)
    # with mirror reflections, then take the distance to the edge joining the
    # outer tip (0, 1) and the inner corner at angle pi/5.
    qx, qy = au, up
    for alpha_ in (0.6 * math.pi, 0.2 * math.pi):
        mx, my = math.cos(alpha_), -math.sin(alpha_)
        over = 2.0 * tf.maximum(qx * mx + qy * my, 0.0)
        qx, qy = qx - over * mx, qy - over * my
    qx = tf.abs(qx)
    bx, by = _STAR_INNER * math.sin(0.2 * math.pi), _STAR_INNER * math.cos(0.2 * math.pi)
    norm = math.hypot(bx, by - 1.0)
    nx, ny = (1.0 - by) / norm, bx / norm  # outward normal of the edge
    star = qx * nx + (qy - 1.0) * ny
    ws = up + 0.5
    semicircle = tf.maximum(tf.sqrt(u * u + ws * ws) - 1.0, -ws)
    return tf.stack([circle, square, triangle, diamond, plus, ring, star, semicircle], axis=1)


def _as_int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as a Python int in ``[lo, hi]`` (bools and floats rejected)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _validate(split, seed, image_size, min_objects, max_objects) -> tuple:
    """Checks the generation config; returns it with Python ints."""
    if not isinstance(split, str) or split not in _STREAMS:
        raise ValueError(f"unknown split {split!r}; valid splits are {SPLITS}")
    seed = _as_int("seed", seed, -(2**63), 2**63 - 1)
    image_size = _as_int("image_size", image_size, 32, 64)
    min_objects = _as_int("min_objects", min_objects, 1, MAX_OBJECTS)
    max_objects = _as_int("max_objects", max_objects, 1, MAX_OBJECTS)
    if min_objects > max_objects:
        raise ValueError(f"min_objects ({min_objects}) must be <= max_objects ({max_objects})")
    return split, seed, image_size, min_objects, max_objects


def _with_article(phrases: tf.Tensor) -> tf.Tensor:
    """Prefixes 'a ' or 'an ' (before a vowel, e.g. 'an orange star')."""
    vowel = tf.strings.regex_full_match(phrases, "[aeiou].*")
    return tf.strings.join([tf.where(vowel, "an ", "a "), phrases])


def _join_phrases(phrases: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """'p0', 'p0 and p1', 'p0, p1 and p2', ... over the first ``n`` phrases."""
    head = tf.strings.reduce_join(phrases[: n - 1], separator=", ")
    return tf.where(n > 1, tf.strings.join([head, " and ", phrases[n - 1]]), phrases[0])


def _generate(index: tf.Tensor, seed: int, split: str, image_size: int,
              min_objects: int, max_objects: int, with_masks: bool = False
              ) -> dict[str, tf.Tensor]:
    """Builds one example with TF ops; the config must already be validated.

    ``with_masks`` adds ``mask`` and ``object_classes`` (see ``make_example``); the ops that
    build them exist only then, so the default graph (and every other output) is unchanged.
    """
    size, k_max = image_size, MAX_OBJECTS
    index = tf.cast(index, tf.int64)
    base = tf.constant([seed, _STREAMS[split]], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, index, alg=_ALG)
    keys = tf.random.experimental.stateless_split(key, num=2, alg=_ALG)

    def uniform(shape, k):
        return tf.random.stateless_uniform(shape, seed=keys[k], alg=_ALG)

    # ---- scene layout: one vector of uniforms, sliced --------------------------
    # [0] n, [1:10] cell permutation, [10:12] caption templates, [12:25] background,
    # then per object: colour, shape, size, radius, jitter y/x, colour jitter rgb.
    r = uniform([25 + 9 * k_max], 0)
    n = min_objects + tf.cast(tf.floor(r[0] * (max_objects - min_objects + 1)), tf.int32)
    n = tf.minimum(n, max_objects)
    cells = tf.argsort(r[1:10], stable=True)[:k_max]
    per = tf.reshape(r[25:], [k_max, 9])
    colours = tf.minimum(tf.cast(per[:, 0] * len(COLOURS), tf.int32), len(COLOURS) - 1)
    shapes = tf.minimum(tf.cast(per[:, 1] * len(SHAPES), tf.int32), len(SHAPES) - 1)
    sizes = tf.cast(per[:, 2] < 0.5, tf.int32)
    present = tf.range(k_max) < n

    cell = size / 3.0
    lo = tf.gather(tf.constant([a for a, _ in _RADIUS_RANGES]), sizes)
    hi = tf.gather(tf.constant([b for _, b in _RADIUS_RANGES]), sizes)
    radius = (lo + (hi - lo) * per[:, 3]) * cell  # pixels
    # Keep the whole object (and its 0.5 px antialiasing rim) inside its cell.
    slack = tf.maximum(0.5 * cell - radius - 0.5, 0.0)
    row = tf.cast(cells // 3, tf.float32)
    col = tf.cast(cells % 3, tf.float32)
    cy = (row + 0.5) * cell + slack * (2.0 * per[:, 4] - 1.0)
    cx = (col + 0.5) * cell + slack * (2.0 * per[:, 5] - 1.0)
    rgb = tf.gather(tf.constant(COLOUR_RGB, tf.float32), colours)
    rgb = tf.clip_by_value(rgb + _COLOUR_JITTER * (2.0 * per[:, 6:9] - 1.0), 0.0, 1.0)

    # ---- render all objects at once, each in a window covering its cell ----
    win = min(size, math.ceil(cell + 1.5))
    oy = tf.clip_by_value(tf.cast(tf.floor(row * cell), tf.int32), 0, size - win)
    ox = tf.clip_by_value(tf.cast(tf.floor(col * cell), tf.int32), 0, size - win)
    steps = tf.range(win, dtype=tf.float32) + 0.5
    u = (tf.cast(ox, tf.float32)[:, None, None] + steps[None, None, :] - cx[:, None, None])
    v = (tf.cast(oy, tf.float32)[:, None, None] + steps[None, :, None] - cy[:, None, None])
    inv_r = 1.0 / radius[:, None, None]
    dist = tf.gather(_shape_distances(u * inv_r, v * inv_r), shapes, axis=1, batch_dims=1)
    alpha = tf.clip_by_value(0.5 - dist * radius[:, None, None], 0.0, 1.0)  # [K,W,W]
    alpha *= tf.cast(present, tf.float32)[:, None, None]
    layers = tf.concat([alpha[..., None] * rgb[:, None, None, :], alpha[..., None]], -1)
    # Objects are disjoint, so summing the padded windows composites them.
    canvas = tf.add_n([
        tf.pad(layers[k], [[oy[k], size - win - oy[k]], [ox[k], size - win - ox[k]], [0, 0]])
        for k in range(k_max)])
    paint, cover = canvas[..., :3], canvas[..., 3:]
    coords = tf.range(size, dtype=tf.float32) + 0.5

    # ---- background ------------------------------------------------------------
    b = r[12:25]
    bg_base = 0.02 + 0.12 * b[0:3]
    angle = 2.0 * math.pi * b[3]
    freq = 0.15 + 0.6 * b[4]  # radians per pixel
    yy, xx = coords[:, None], coords[None, :]
    stripes = tf.sin(freq * (xx * tf.cos(angle) + yy * tf.sin(angle)) + 2.0 * math.pi * b[5])
    tint = 0.4 + 0.6 * b[6:9]
    g_angle = 2.0 * math.pi * b[9]
    ramp = (xx * tf.cos(g_angle) + yy * tf.sin(g_angle)) / size
    bg = (bg_base + (0.02 + 0.05 * b[10]) * tint * stripes[..., None]
          + 0.08 * b[11] * ramp[..., None])
    noise = 2.0 * tf.random.stateless_uniform([size, size, 3], seed=keys[1], alg=_ALG) - 1.0
    bg = tf.clip_by_value(bg + (0.015 + 0.035 * b[12]) * noise, 0.0, _BG_MAX)
    image = bg * (1.0 - cover) + paint + _OBJECT_NOISE * cover * noise
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)

    # ---- annotations ---------------------------------------------------------
    ext = tf.gather(tf.constant(_SHAPE_EXTENTS, tf.float32), shapes)  # [K,4]
    boxes = tf.stack([cy + ext[:, 0] * radius, cx + ext[:, 1] * radius,
                      cy + ext[:, 2] * radius, cx + ext[:, 3] * radius], axis=1) / size
    boxes = tf.where(present[:, None], tf.clip_by_value(boxes, 0.0, 1.0), 0.0)
    pad = lambda x: tf.where(present, x, -1)  # noqa: E731
    label = tf.where(n == 1, colours[0] * len(SHAPES) + shapes[0], -1)

    # ---- captions --------------------------------------------------------------
    colour_w = tf.gather(tf.constant(COLOURS), colours)
    shape_w = tf.gather(tf.constant(SHAPES), shapes)
    size_w = tf.gather(tf.constant(SIZES), sizes)
    where_w = tf.gather(tf.constant(POSITION_PHRASES), cells)
    sized = tf.strings.join([size_w, colour_w, shape_w], separator=" ")
    plain = tf.strings.join([colour_w, shape_w], separator=" ")
    single = _with_article(tf.stack([
        tf.strings.join([sized[0], where_w[0]], separator=" "),
        plain[0],
        sized[0],
        tf.strings.join([plain[0], where_w[0]], separator=" "),
    ]))[tf.minimum(tf.cast(r[10] * 4, tf.int32), 3)]
    with_sizes = (r[11] < 0.5) & (n <= 2)
    multi = _join_phrases(_with_article(tf.where(with_sizes, sized, plain)), n)
    caption = tf.where(n == 1, single, multi)
    sentences = tf.strings.join(["A ", sized, " is ", where_w, "."])
    long_caption = tf.strings.join([
        tf.strings.reduce_join(sentences[:n], separator=" "),
        " The scene has ", tf.gather(tf.constant(_NUM_WORDS), n),
        tf.where(n == 1, " object", " objects"), " on a dark textured background."])

    masks = {}
    if with_masks:
        # Object k owns the pixels whose centre lies inside its shape (alpha >= 0.5, i.e.
        # distance <= 0); objects are disjoint, so the max of the padded windows composites.
        inside = tf.cast(alpha >= 0.5, tf.int32) * tf.range(1, k_max + 1)[:, None, None]
        mask = tf.reduce_max(tf.stack([
            tf.pad(inside[k], [[oy[k], size - win - oy[k]], [ox[k], size - win - ox[k]]])
            for k in range(k_max)]), axis=0)
        masks = {"mask": tf.ensure_shape(mask, [size, size]),
                 "object_classes": pad(colours * len(SHAPES) + shapes)}

    return {
        **masks,
        "image": tf.ensure_shape(image, [size, size, 3]),
        "caption": caption,
        "long_caption": long_caption,
        "num_objects": n,
        "boxes": tf.ensure_shape(boxes, [k_max, 4]),
        "colours": pad(colours),
        "shapes": pad(shapes),
        "sizes": pad(sizes),
        "positions": pad(tf.cast(cells, tf.int32)),
        "label": label,
        "index": index,
    }


def regression_target(example: dict, kind: str) -> tf.Tensor:
    """A continuous target of a scene (``config.data.regression_target``), float32 [].

    ``kind`` is one of ``REGRESSION_TARGETS``: ``"size"`` the object's box area as a fraction
    of the image, ``"x"`` / ``"y"`` its box centre in ``[0, 1]`` (left to right, top to
    bottom). Defined for single-object scenes only; -1 for the others (like ``label``).
    """
    if kind not in REGRESSION_TARGETS:
        raise ValueError(f"config.data.regression_target={kind!r}; expected one of "
                         f"{REGRESSION_TARGETS}.")
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(example["boxes"][0], tf.float32))
    value = {"size": lambda: (ymax - ymin) * (xmax - xmin), "x": lambda: (xmin + xmax) / 2.0,
             "y": lambda: (ymin + ymax) / 2.0}[kind]()
    return tf.where(tf.equal(example["num_objects"], 1), value, -1.0)


def _mapper(split, seed, image_size, min_objects, max_objects, with_masks=False):
    """The map function of a validated config: int64 index -> example dict."""

    def fn(index):
        return _generate(index, seed, split, image_size, min_objects, max_objects, with_masks)

    return fn


def example_fn(split: str = "train", *, seed: int = 0, image_size: int = 64,
               min_objects: int = 1, max_objects: int = MAX_OBJECTS, with_masks: bool = False):
    """The map function ``int64 index -> example dict`` for use inside a ``tf.data`` map.

    This is what ``dataset`` maps over its indices; pipelines that choose their own
    indices (e.g. one host's rows of every global batch) map it over theirs.
    ``with_masks``: see ``make_example``.
    """
    return _mapper(*_validate(split, seed, image_size, min_objects, max_objects),
                   bool(with_masks))


@functools.lru_cache(maxsize=32)
def _single_example_fn(*config):
    """A traced-once function: index -> the example, via a one-element tf.data map."""
    fn = _mapper(*config)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64)], autograph=False)
    def single(index):
        return tf.data.Dataset.from_tensors(index).map(fn).get_single_element()

    return single


def make_example(index, *, seed: int = 0, split: str = "train", image_size: int = 64,
                 min_objects: int = 1, max_objects: int = MAX_OBJECTS,
                 with_masks: bool = False) -> dict[str, tf.Tensor]:
    """Generates example ``index`` of a split (a pure function of its arguments).

    Works eagerly and inside ``tf.function`` (``index`` may be a Python int or
    an int scalar tensor).  The example is generated by the same ``tf.data``
    map as ``dataset``, so it is bitwise identical to that dataset's element.
    To generate many examples, use ``dataset`` (this is a one-element pipeline).

    Returns:
      A dict of tensors (``S = image_size``, ``K = MAX_OBJECTS``):
        ``image`` uint8 [S, S, 3]; ``caption`` and ``long_caption`` string [];
        ``num_objects`` int32 []; ``boxes`` float32 [K, 4] as normalised
        (ymin, xmin, ymax, xmax), zeros for padding; ``colours``, ``shapes``,
        ``sizes``, ``positions`` int32 [K], indices into ``COLOURS``,
        ``SHAPES``, ``SIZES``, ``POSITIONS`` with -1 padding; ``label`` int32 []
        (index into ``CLASS_NAMES`` for single-object scenes, else -1);
        ``index`` int64 [].
      With ``with_masks=True`` (for evaluating segmentation; every other output is
      unchanged, bit for bit) also: ``mask`` int32 [S, S], 0 for background and ``k + 1``
      on the pixels whose centre lies inside object ``k``; ``object_classes`` int32 [K],
      each object's ``CLASS_NAMES`` index ``colour * len(SHAPES) + shape``, -1 padding.

    Raises:
      ValueError: for an unknown split or an invalid seed, size or object count.
    """
    config = _validate(split, seed, image_size, min_objects, max_objects) + (bool(with_masks),)
    # Go through the same tf.data map as `dataset`: graph rewrites inside
    # tf.data functions may change float rounding (last bit) relative to eager
    # or tf.function execution, which could flip a pixel by one level.
    return _single_example_fn(*config)(tf.cast(index, tf.int64))


def dataset(split: str, *, seed: int = 0, image_size: int = 64, min_objects: int = 1,
            max_objects: int = MAX_OBJECTS, start_index: int = 0,
            num_examples: int | None = None, with_masks: bool = False) -> tf.data.Dataset:
    """An unbatched ``tf.data.Dataset`` of ``make_example`` dicts, in index order.

    ``"train"`` yields indices ``start_index, start_index + 1, ...`` forever
    unless ``num_examples`` is given; ``"test"`` is the fixed set of indices
    ``[0, TEST_SIZE)`` of the test stream, which ``start_index`` and
    ``num_examples`` may slice.  Elements are generated with a parallel,
    order-preserving map, so the result does not depend on parallelism.
    ``with_masks``: see ``make_example``.
    """
    config = _validate(split, seed, image_size, min_objects, max_objects)
    start_index = _as_int("start_index", start_index, 0, 2**62)
    if num_examples is not None:
        num_examples = _as_int("num_examples", num_examples, 0, 2**62)
    if split == "test":
        if start_index > TEST_SIZE:
            raise ValueError(
                f"start_index {start_index} is past the test split (size {TEST_SIZE})")
        stop = TEST_SIZE if num_examples is None else min(TEST_SIZE, start_index + num_examples)
        indices = tf.data.Dataset.range(start_index, stop)
    elif num_examples is None:
        indices = tf.data.Dataset.counter(start_index)
    else:
        indices = tf.data.Dataset.range(start_index, start_index + num_examples)
    return indices.map(_mapper(*config, bool(with_masks)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)

