"""``python -m contrastive_jax.evaluate``: evaluate a checkpoint of ours or public CLIP weights.

Two modes:

* **Benchmark suite** (``--tasks``): CLIP_benchmark-style tasks on TFDS datasets
  (:mod:`contrastive_jax.evaluate.suite`), one JSON per (model, dataset, task) plus
  ``results.md`` in ``--output_dir``::

    python -m contrastive_jax.evaluate --clip_weights ViT-B-32.safetensors \\
        --activation quick_gelu --vocab bpe_simple_vocab_16e6.txt.gz \\
        --tasks zeroshot,linear_probe --datasets cifar10 --output_dir /tmp/eval

  The model is ``--clip_weights`` (an OpenAI / open_clip ViT state dict:
  ``.safetensors``, or a torch file read without executing pickled code) with the CLIP BPE
  ``--vocab``, CLIP normalisation and its own image size; or a run of ours:
  ``--config FILE --workdir DIR`` (``--step N``) or ``--checkpoint DIR/checkpoints/N``, with
  the run's tokenizer, image size and normalisation.

* **The run's own evaluators** (no ``--tasks``): ``--config`` + checkpoint as above, runs
  ``config.eval.evaluators`` and prints / writes (``--output F.json``) the metrics.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from contrastive_jax import parallel, train, writers
from contrastive_jax import evaluate
from contrastive_jax.data import tokenizers
from contrastive_jax.evaluate import embedding, suite
from contrastive_jax.models import clip_import


def _checkpoint_dir(workdir, step, checkpoint):
  if checkpoint:
    path = os.path.normpath(checkpoint)
    return os.path.dirname(path), int(os.path.basename(path))
  if workdir:
    return os.path.join(workdir, "checkpoints"), step
  raise app.UsageError("Give --clip_weights, or --config with --workdir (and optionally "
                       "--step) or --checkpoint.")


def main():
  config_flag = config_flags.DEFINE_config_file("config", None, "The training configuration.",
                                                lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  checkpoint = flags.DEFINE_string(
      "checkpoint", None, "A checkpoint step directory (…/checkpoints/<step>); overrides "
      "--workdir/--step.")
  output = flags.DEFINE_string("output", None, "Run's evaluators: where to write the JSON.")
  clip_weights = flags.DEFINE_string("clip_weights", None, "OpenAI / open_clip ViT weights.")
  activation = flags.DEFINE_enum("activation", None, ["quick_gelu", "gelu_exact"],
                                 "MLP activation of --clip_weights (default: from an "
                                 "open_clip_config.json beside them, or TorchScript files).")
  vocab = flags.DEFINE_string("vocab", None, "bpe_simple_vocab_16e6.txt.gz for --clip_weights.")
  image_heads = flags.DEFINE_integer("image_heads", None, "Attention heads of the image tower "
                                     "(default width // 64; ViT-H/g/bigG need it).")
  text_heads = flags.DEFINE_integer("text_heads", None, "Attention heads of the text tower "
                                    "(default 8, or the open_clip json's).")
  image_size = flags.DEFINE_integer("image_size", None, "Image side for --clip_weights "
                                    "(default: the weights' own, patch size × grid).")
  tasks = flags.DEFINE_list("tasks", None, f"Suite tasks: {','.join(suite.TASKS)}.")
  datasets = flags.DEFINE_list("datasets", None, "TFDS datasets (e.g. cifar10,coco_captions) "
                               "or shards:GLOB (retrieval on multi-caption shards).")
  output_dir = flags.DEFINE_string("output_dir", None, "Suite: results directory.")
  batch_size = flags.DEFINE_integer("batch_size", 256, "Suite: images per batch (all devices).")
  data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir (default $TFDS_DATA_DIR).")
  num_train = flags.DEFINE_integer("num_train", None, "Suite: first N training examples.")
  num_test = flags.DEFINE_integer("num_test", None, "Suite: first N test examples.")
  shots = flags.DEFINE_integer("shots", 16, "Suite: examples per class for fewshot / gda.")

  def load_model(mesh) -> suite.Model:
    if clip_weights.value:
      if not vocab.value:
        raise app.UsageError("--clip_weights needs --vocab (the CLIP BPE vocabulary).")
      model_config, params = clip_import.load(clip_weights.value, activation=activation.value,
                                              image_heads=image_heads.value,
                                              text_heads=text_heads.value)
      tokenizer = tokenizers.make_tokenizer("clip_bpe", vocab_path=vocab.value,
                                            context_length=model_config["text"].get(
                                                "context_length", 77))
      model = clip_import.two_tower(model_config, vocab_size=tokenizer.vocab_size,
                                    context_length=tokenizer.context_length)
      variables = jax.device_put({"params": params}, parallel.replicated(mesh))
      return suite.Model(os.path.basename(clip_weights.value), embedding.jitted_encoders(model),
                         variables, tokenizer, image_size.value or model_config["image_size"],
                         "clip")
    config = config_flag.value
    if config is None:
      raise app.UsageError("Give --config with the checkpoint (or --clip_weights).")
    directory, at = _checkpoint_dir(workdir.value, step.value, checkpoint.value)
    tokenizer, objective, _, variables, at = train.restore_variables(config, directory, at)
    name = os.path.basename(os.path.dirname(os.path.abspath(directory))) or "model"
    return suite.Model(f"{name}@{at}", embedding.jitted_encoders(objective.model), variables,
                       tokenizer, config.data.image_size,
                       config.data.get("normalization", "minus_one_to_one"))

  def run_suite():
    if not datasets.value or not output_dir.value:
      raise app.UsageError("--tasks needs --datasets and --output_dir.")
    mesh = parallel.make_mesh(-1)
    model = load_model(mesh)
    options = suite.Options(batch_size=batch_size.value, data_dir=data_dir.value,
                            num_train=num_train.value, num_test=num_test.value,
                            shots=shots.value)
    os.makedirs(output_dir.value, exist_ok=True)
    table = suite.run(model, tasks.value, datasets.value, mesh, options, output_dir.value)
    if jax.process_index() == 0:
      print(table)

  def run_config_evaluators():
    config = config_flag.value
    if config is None:
      raise app.UsageError("Without --tasks, --config names the evaluators to run.")
    directory, at = _checkpoint_dir(workdir.value, step.value, checkpoint.value)
    tokenizer, objective, mesh, variables, at = train.restore_variables(config, directory, at)
    logging.info("Evaluating step %d from %s.", at, directory)
    results = evaluate.run_evaluators(config, evaluate.jitted_encoders(objective.model),
                                      variables, tokenizer, mesh)
    if jax.process_index() == 0:
      text = json.dumps({"step": at, **results}, indent=2, sort_keys=True)
      print(text)
      if output.value:
        os.makedirs(os.path.dirname(os.path.abspath(output.value)), exist_ok=True)
        with open(output.value, "w") as f:
          f.write(text + "\n")

  def run(argv):
    del argv
    writers.quiet_library_logs()
    if tasks.value:
      run_suite()
    else:
      run_config_evaluators()

  app.run(run)


if __name__ == "__main__":
  main()
