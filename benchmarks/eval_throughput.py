"""Image-embedding throughput of evaluation against the image tower's plain forward.

Evaluation embeds host batches through ``embedding.embed_batches`` (pad to the batch size,
shard over every device, encode, gather back to numpy). This compares its images/s with the
plain jitted forward of the same image tower on a batch already on the devices (the best the
model can do), for a config's model; the goal is a ratio ≥ 0.9. Both use synthetic images,
so decoding is not measured (``benchmarks/input_pipeline.py`` measures it).

  python benchmarks/eval_throughput.py --config configs/clip_shards.py:data=x,size=cpu \\
      --batch 256 --batches 20 --output benchmarks/results/eval_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import numpy as np

from contrastive_jax import parallel
from contrastive_jax.evaluate import embedding
from contrastive_jax.models.two_tower import TwoTower


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(path.split(":", 1)[1] if ":" in path else None)


def measure(config, batch: int, batches: int, rounds: int = 3) -> dict:
  """``{"forward_images_per_s", "evaluation_images_per_s", "ratio", ...}`` (best of rounds)."""
  mesh = parallel.make_mesh(-1)
  size = config.data.image_size
  model = TwoTower(image=dict(config.model.image), text=dict(
      config.model.text, vocab_size=258, context_length=config.tokenizer.context_length),
      embed_dim=config.model.embed_dim)
  rng = np.random.default_rng(0)
  host = [rng.normal(size=(batch, size, size, 3)).astype(np.float32) for _ in range(4)]
  variables = model.init(jax.random.PRNGKey(0), host[0][:1], np.zeros((1, 4), np.int32),
                         np.ones((1, 4), bool))
  variables = jax.device_put(variables, parallel.replicated(mesh))
  encoders = embedding.jitted_encoders(model)
  on_device = parallel.to_global([host[0]], mesh)[0]

  def forward():
    out = None
    for _ in range(batches):
      out = encoders.image(variables, on_device)
    jax.block_until_ready(out)

  def evaluation():
    stream = ({"image": host[i % len(host)]} for i in range(batches))
    embedding.embed_batches(encoders.image, variables, stream, ("image",), mesh, batch)

  forward(), evaluation()  # compile and warm up
  best = {"forward": 0.0, "evaluation": 0.0}
  for _ in range(rounds):
    for name, fn in (("forward", forward), ("evaluation", evaluation)):
      start = time.perf_counter()
      fn()
      best[name] = max(best[name], batch * batches / (time.perf_counter() - start))
  return {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
          "image_size": size, "batch": batch, "batches": batches,
          "image_tower": dict(config.model.image),
          "forward_images_per_s": best["forward"],
          "evaluation_images_per_s": best["evaluation"],
          "ratio": best["evaluation"] / best["forward"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/clip_shards.py:data=unused,size=cpu")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--output", default="benchmarks/results/eval_throughput_cpu.json")
  args = parser.parse_args()
  result = measure(load_config(args.config), args.batch, args.batches)
  print(json.dumps(result, indent=2))
  if args.output:
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
