"""The README's table of every objective: paper, scope, configs and the comparison results.

Reads the two comparison runs of ``benchmarks/compare_objectives.py`` (image-text objectives
on shapes, zero-shot acc1; image-only objectives on Fashion-MNIST, kNN acc1, through
``ssl_fashion_mnist.py``) and writes the table between ``<!-- objectives:start -->`` and
``<!-- objectives:end -->`` of a README:

  python benchmarks/objectives_table.py --readme README.md

Every objective registered in ``contrastive_jax.objectives.OBJECTIVES`` must have a row here
(tests/test_benchmarks.py checks it), and so must the pure losses that have no objective.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMAGE_TEXT_JSON = RESULTS / "compare_objectives_cpu.json"
IMAGE_ONLY_JSON = RESULTS / "compare_image_only_cpu.json"
MARKERS = ("<!-- objectives:start -->", "<!-- objectives:end -->")

# name -> (paper, scope, METHODS.md section). Scope: "image-text" / "image-only" pretraining,
# "labels" (needs class labels or a regression target), "option" (of another objective),
# "adaptation" (fine-tunes a frozen checkpoint), "loss" (a pure loss or piece without an
# objective of its own).
CATALOGUE = {
    "clip": ("Radford et al. 2021, CLIP", "image-text", "1.1"),
    "siglip": ("Zhai et al. 2023, SigLIP", "image-text", "1.2"),
    "filip": ("Yao et al. 2022, FILIP", "image-text", "1.3"),
    "protoclip": ("Chen et al. 2023, ProtoCLIP", "image-text", "1.4"),
    "dreamlip": ("Zheng et al. 2024, DreamLIP", "image-text", "1.5"),
    "convirt": ("Zhang et al. 2022, ConVIRT", "image-text", "1.15"),
    "slip": ("Mu et al. 2022, SLIP", "image-text", "1.16"),
    "cliprocket": ("Fini et al. 2023, CLIP🚀 / CL2L", "image-text", "1.16"),
    "simclr": ("Chen et al. 2020, SimCLR", "image-only", "1.7"),
    "dcl": ("Yeh et al. 2022, DCL / DCLW", "image-only", "1.8"),
    "swav": ("Caron et al. 2020, SwAV", "image-only", "1.6"),
    "mochi": ("Kalantidis et al. 2020, MoCHi (MoCo-v2 base)", "image-only", "1.9"),
    "pixpro": ("Xie et al. 2021, PixPro", "image-only", "1.10"),
    "isogclr": ("Qiu et al. 2023, iSogCLR", "image-only", "1.11"),
    "groco": ("Shvetsova et al. 2023, GroCo", "image-only", "1.12"),
    "cacr": ("Zheng et al. 2023, CACR", "image-only", "2.15"),
    "ft": ("Zhu et al. 2021, Feature Transformation", "image-only", "2.10"),
    "mlcd": ("An et al. 2024, MLCD", "image-only", "1.13"),
    "beclr": ("Poulakakis-Daktylidis & Jamali-Rad 2024, BECLR (DyCE)", "image-only", "1.14"),
    "sbcl": ("Hou et al. 2023, SBCL", "labels", "2.36"),
    "hydra": ("Wu et al. 2024, Hydra / SimLAP", "labels", "2.5"),
    "supremix": ("Wu et al. 2023, SupReMix (regression)", "labels", "2.11"),
    "simclr_bss": ("Scalbert et al. 2024, Batch Styles Standardization", "option", "2.9"),
    "simclr_adainf": ("Wang, Zhang, Wang 2024, AdaInf", "option", "2.23"),
    "adclip": ("Singha et al. 2023, AD-CLIP (prompts on a frozen CLIP)", "adaptation", "2.16"),
    "region_text_loss": ("Kim, Angelova, Kuo 2023, DITO region-text loss", "loss", "2.8"),
    "hard_info_nce_loss": ("Wang & Liu 2021, hard contrastive loss", "loss", "2.1"),
    "geometry": ("Wang & Isola 2020; Wang & Liu 2021, uniformity / alignment / tolerance",
                 "metrics", "2.1"),
    "soft_contrastive_loss": ("soft contrastive learning for novel category discovery", "loss",
                              "2.26"),
    "sepclr_loss": ("Louiset et al. 2024, SepCLR", "loss", "2.6"),
    "same_cluster_nt_xent_loss": ("Zhang et al. 2024, feature suppression (MCL)", "loss",
                                  "2.17"),
    "supcon_loss": ("Khosla et al. 2020, SupCon", "loss", "0.2"),
    "xclip_loss": ("Ma et al. 2022, X-CLIP multi-grained scores", "loss", "2.21"),
    "whitenedcse_loss": ("Zhuo et al. 2023, WhitenedCSE shuffled group whitening", "loss",
                         "2.34"),
    "weighted_info_nce": ("DebCSE 2023, inverse-propensity weighted negatives", "loss", "2.33"),
}


# Rows without a comparison metric: why, and where their numbers are.
NO_COMPARISON = {
    "supremix": "regression (shapes object size): trains in the tests, no kNN / zero-shot metric",
    "simclr_adainf": "shapes only (its generated stream); trains in the tests",
    "adclip": "hazy shapes scenes 0.34 → 0.45 acc1 after 4 steps (README: Dense zero-shot and "
              "training-free adaptation)",
}


def configs_of(name: str) -> list:
  stems = sorted(p.stem for p in (REPO / "configs").glob(f"{name}_*.py"))
  return [s for s in stems if s[len(name) + 1:] in ("shapes", "fashion_mnist", "coco", "shards")]


def _load(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def results() -> dict:
  """name -> result text from the two comparison JSONs."""
  out = {}
  image_text = _load(IMAGE_TEXT_JSON) or []
  for r in image_text:
    out[r["objective"]] = (f"{r['zeroshot_acc1']:.3f} zero-shot acc1 (shapes, {r['steps']} "
                           "steps)")
  image_only = _load(IMAGE_ONLY_JSON) or {}
  for r in image_only.get("runs", []):
    out[r["method"]] = f"{100 * r['knn_acc1']:.1f} % kNN acc1 (Fashion-MNIST, {r['steps']} steps)"
  return out


def markdown() -> str:
  found = results()
  image_only = _load(IMAGE_ONLY_JSON) or {}
  raw = (image_only.get("raw_pixels") or {}).get("knn_acc1")
  lines = ["| name | paper | scope | configs | result |", "|---|---|---|---|---|"]
  for name, (paper, scope, section) in CATALOGUE.items():
    configs = ", ".join(f"`{c}`" for c in configs_of(name)) or "–"
    if scope in ("loss", "metrics"):
      result = "pure function, tested (no objective)"
    else:
      result = found.get(name, NO_COMPARISON.get(name, "not in the comparison runs"))
    lines.append(f"| `{name}` | {paper} (§{section}) | {scope} | {configs} | {result} |")
  if raw is not None:
    lines.append("")
    lines.append(f"Raw pixels under the same Fashion-MNIST kNN evaluator: {100 * raw:.1f} %.")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--readme", default=None, help="README whose table to replace")
  args = parser.parse_args(argv)
  table = markdown()
  print(table)
  if args.readme:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare_objectives import replace_in_readme
    replace_in_readme(args.readme, table, MARKERS)


if __name__ == "__main__":
  main()
