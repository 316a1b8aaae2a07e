"""Zero-shot class names and prompt templates of CLIP_benchmark, keyed by TFDS dataset name.

Each ``prompts/<tfds name>.json`` holds ``classnames`` in the TFDS label order, the
``templates`` CLIP_benchmark uses for that dataset (``{c}`` marks the class name, as in
CLIP_benchmark's JSON), the ``source`` (repository, file and commit) and a ``label_order``
note saying how the order was checked against TFDS (e.g. Food-101: TFDS and torchvision
order two classes differently; the file follows TFDS).

``load`` returns the templates as ``str.format`` strings with one positional ``{}``, the form
:func:`contrastive_jax.evaluate.zeroshot.classifier` takes.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
from typing import Dict, List, Tuple

_DIR = pathlib.Path(__file__).resolve().parent / "prompts"
# CLIP_benchmark dataset names -> TFDS names, so either may be passed.
ALIASES = {
    "imagenet1k": "imagenet2012",
    "pets": "oxford_iiit_pet",
    "flowers": "oxford_flowers102",
    "cars": "cars196",
    "svhn": "svhn_cropped",
    "pcam": "patch_camelyon",
    "diabetic_retinopathy": "diabetic_retinopathy_detection",
}


def canonical_name(dataset: str) -> str:
  """TFDS base name of ``dataset``: drops a ``tfds/`` or ``vtab/`` prefix, a ``/config`` and a
  ``:version`` (``"eurosat/rgb:2.0.0"`` -> ``"eurosat"``), and maps CLIP_benchmark aliases."""
  name = dataset.strip()
  for prefix in ("tfds/", "vtab/"):
    if name.startswith(prefix):
      name = name[len(prefix):]
  name = name.split(":")[0].split("/")[0]
  return ALIASES.get(name, name)


def available() -> List[str]:
  """The TFDS names that have a prompts file, sorted."""
  return sorted(p.stem for p in _DIR.glob("*.json"))


@functools.lru_cache(maxsize=None)
def _read(name: str) -> Dict:
  path = _DIR / f"{name}.json"
  if not path.exists():
    raise KeyError(f"No zero-shot prompts for dataset {name!r}; available: {available()}.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def record(dataset: str) -> Dict:
  """The whole JSON record of ``dataset`` (class names, raw ``{c}`` templates, source, note)."""
  return copy.deepcopy(_read(canonical_name(dataset)))


def load(dataset: str) -> Tuple[List[str], List[str]]:
  """``(class_names, templates)`` of ``dataset`` (a TFDS name, optionally with config/version,
  or a CLIP_benchmark name).

  ``class_names[i]`` names TFDS label ``i``; ``templates`` are format strings with one ``{}``.
  """
  rec = _read(canonical_name(dataset))
  templates = [t.replace("{c}", "{}") for t in rec["templates"]]
  return list(rec["classnames"]), templates
