"""``python -m contrastive_jax.evaluate --config FILE --workdir DIR [--step N] [--output F.json]``.

Loads the newest complete checkpoint of the workdir (or ``--step N``, or ``--checkpoint
DIR/checkpoints/N``), runs the evaluators named in ``config.eval.evaluators``, prints the
metrics and writes them as JSON (keys such as ``zeroshot/shapes/acc1``).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from contrastive_jax import evaluate, train, writers


def main():
  config_flag = config_flags.DEFINE_config_file("config", None, "The training configuration.",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  step_flag = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  checkpoint_flag = flags.DEFINE_string(
      "checkpoint", None, "A checkpoint step directory (…/checkpoints/<step>); overrides "
      "--workdir/--step.")
  output_flag = flags.DEFINE_string("output", None, "Where to write the metrics as JSON.")
  flags.mark_flags_as_required(["config"])

  def run(argv):
    del argv
    writers.quiet_library_logs()
    config = config_flag.value
    if checkpoint_flag.value:
      path = os.path.normpath(checkpoint_flag.value)
      directory, step = os.path.dirname(path), int(os.path.basename(path))
    elif workdir_flag.value:
      directory, step = os.path.join(workdir_flag.value, "checkpoints"), step_flag.value
    else:
      raise app.UsageError("Give --workdir (and optionally --step) or --checkpoint.")
    tokenizer, objective, mesh, variables, step = train.restore_variables(config, directory,
                                                                         step)
    logging.info("Evaluating step %d from %s.", step, directory)
    results = evaluate.run_evaluators(config, evaluate.jitted_encoders(objective.model),
                                      variables, tokenizer, mesh)
    if jax.process_index() == 0:
      text = json.dumps({"step": step, **results}, indent=2, sort_keys=True)
      print(text)
      if output_flag.value:
        os.makedirs(os.path.dirname(os.path.abspath(output_flag.value)), exist_ok=True)
        with open(output_flag.value, "w") as f:
          f.write(text + "\n")

  app.run(run)


if __name__ == "__main__":
  main()
