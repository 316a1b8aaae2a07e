"""Bad configurations refused before anything is built or compiled, and the resume check.

* :func:`validate`: what the config alone decides. The mesh fits the devices, the global
  batch (and the evaluation batch) splits over devices, hosts and micro-batches, the counters
  are positive, the objective and tokenizer exist, and the objective's batch keys are ones the
  configured data source, views and subcaptions produce
  (:func:`contrastive_jax.data.pipeline.provided_batch_keys`). Every problem found is listed in
  one :class:`ConfigError`, each naming its config key and the fix.
* :func:`check_resume`: a workdir whose newest checkpoint was made with another model shape
  (``model.*``, ``tokenizer.*``, the image size, state sizes of the loss) is refused, naming
  each differing key with both values.
* :func:`check_checkpoint_arrays`: every array of a checkpoint against the state it is restored
  into, from the checkpoint's metadata only (orbax refuses a shape mismatch without naming the
  array, and silently casts a dtype mismatch).
* :func:`parse_flags`: ``app.run``'s flags parser with a clear message for an override of a
  config key that does not exist (``--config.model.widht=64``).

Checkpoints are read by orbax as JSON and tensorstore (OCDBT) arrays: nothing is unpickled.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np

from contrastive_jax import checkpointing, parallel
from contrastive_jax.data import pipeline, tokenizers
from contrastive_jax.objectives import OBJECTIVES, base as objective_base, make_objective


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the config key(s) and the fix."""


# Where each batch key comes from, for the message when an objective needs one the data lacks.
KEY_FIXES = {
    "text": "a captioned source (config.data.source 'shapes' or 'shards', or a TFDS dataset "
            "with captions) and config.tokenizer",
    "subcaptions": "config.data.subcaptions (e.g. dict(num_subcaptions=3, key='long_caption'))",
    "views": "config.data.views.ssl (e.g. dict(num=2))",
    "view_boxes": "config.data.views.ssl.boxes=True",
    "crops": "config.data.views.multicrop (e.g. dict(num=2, size=16))",
    "local_views": "config.data.views.local (e.g. dict(num=2))",
    "text_aug": "config.data.views.text (e.g. dict(num=2))",
    "target": "config.data.regression_target (shapes: 'size', 'x' or 'y')",
}
KEY_FIXES.update(text_mask=KEY_FIXES["text"], subcaption_mask=KEY_FIXES["subcaptions"],
                 text_aug_mask=KEY_FIXES["text_aug"])

# Config keys that decide the train state's shapes, besides all of ``objective``, ``tokenizer``
# and ``model`` (except the leaves in NON_SHAPE_MODEL_KEYS and initial values ``*_init``).
SHAPE_KEYS = ("data.image_size", "data.num_examples", "loss.num_prototypes", "loss.queue_size",
              "loss.num_examples", "loss.num_clusters", "loss.proj_dim", "loss.episode_size",
              "loss.teacher", "loss.teacher_clusters", "loss.bank_size", "loss.memory_size",
              "loss.num_classes", "loss.max_subclasses", "optimizer.name")
NON_SHAPE_MODEL_KEYS = ("dtype", "remat", "batch_norm")


def _fail(problems: Sequence[str], what: str) -> None:
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"{what} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def mesh_shape(data_axis_size: Optional[int], fsdp_axis_size: int,
               num_devices: int) -> Tuple[int, int]:
  """``(data, fsdp)`` of the mesh :func:`parallel.make_mesh` builds on ``num_devices``
  (``data_axis_size`` -1 or None: all devices); raises :class:`ConfigError` if it does not
  fit."""
  fsdp = fsdp_axis_size
  if not _is_int(fsdp) or fsdp < 1 or num_devices % fsdp:
    raise ConfigError(f"config.parallel.fsdp_axis_size={fsdp!r} does not divide the "
                      f"{num_devices} devices; use a divisor of {num_devices} (1: parameters "
                      "replicated).")
  data = num_devices // fsdp if data_axis_size in (None, -1) else data_axis_size
  if not _is_int(data) or data < 1:
    raise ConfigError(f"config.parallel.data_axis_size={data_axis_size!r}; expected a positive "
                      "int, or -1 for all devices.")
  if data * fsdp > num_devices:
    raise ConfigError(
        f"config.parallel.data_axis_size={data_axis_size!r} × fsdp_axis_size={fsdp} needs "
        f"more than the {num_devices} devices that exist; use data_axis_size=-1 (all devices) "
        f"or at most {num_devices // fsdp}.")
  return data, fsdp


def check_batch_size(batch_size: int, *, num_devices: int, num_processes: int = 1,
                     accum_steps: int = 1, key: str = "config.batch_size") -> None:
  """Refuses a global batch (``key``) that does not split evenly over the mesh's
  ``num_devices``, the hosts, and ``accum_steps`` micro-batches per device."""
  if not _is_int(batch_size) or batch_size < 1:
    raise ConfigError(f"{key}={batch_size!r}; expected a positive int.")
  if batch_size % num_devices:
    raise ConfigError(f"Global batch size {batch_size} does not divide by the {num_devices} "
                      f"devices of the data axis; choose a multiple of {num_devices} ({key}).")
  if batch_size % num_processes:
    raise ConfigError(f"Global batch size {batch_size} does not divide by the {num_processes} "
                      f"processes; choose a multiple of {num_processes} ({key}).")
  if batch_size % (num_devices * accum_steps):
    multiple = num_devices * accum_steps
    raise ConfigError(f"{key}={batch_size} does not split into config.parallel.accum_steps="
                      f"{accum_steps} micro-batches on each of the {num_devices} devices; use "
                      f"a multiple of {multiple} (or fewer accum_steps).")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _positive(config, key: str, problems: List[str], minimum: int = 1) -> None:
  node = config
  for part in key.split("."):
    if part not in node:
      return  # optional keys: their users have defaults
    node = node[part]
  if not _is_int(node) or node < minimum:
    problems.append(f"config.{key}={node!r}; expected an int ≥ {minimum}.")


def objective_inputs(config) -> Tuple[Tuple[str, ...], Tuple[str, ...], Any]:
  """``(needed, provided, objective)``: the batch keys the configured objective reads, the
  ones the configured data produces, and the objective (built without parameters; raises
  :class:`ConfigError` if the objective, tokenizer or data options are refused)."""
  stage = "config.tokenizer"
  try:
    tokenizer = tokenizers.make_tokenizer(**config.tokenizer) if "tokenizer" in config else None
    stage = f"config.objective={config.objective!r}"
    objective = make_objective(config, tokenizer)
    stage = "config.data"
    pipeline.training_features(config.data, tokenizer)  # the data's own option checks
  except ValueError as e:  # these name their key already
    raise ConfigError(str(e)) from e
  except (KeyError, TypeError, AttributeError) as e:  # a field the builder reads is missing
    example = (f"; compare with configs/{config.objective}_shapes.py"
               if stage.startswith("config.objective") else "")
    detail = str(e).strip('"')
    raise ConfigError(f"{stage} cannot be built from this config: {type(e).__name__}: {detail} "
                      f"(a field it reads is missing or of the wrong kind{example}).") from e
  provided = pipeline.provided_batch_keys(config.data, has_tokenizer=tokenizer is not None)
  return tuple(objective.batch_keys), provided, objective


def validate(config, *, num_devices: Optional[int] = None,
             num_processes: Optional[int] = None) -> None:
  """Refuses a configuration that cannot train, before anything is built or compiled.

  Args:
    config: the training config (``ml_collections.ConfigDict``).
    num_devices: devices of the run (None: ``jax.device_count()``).
    num_processes: hosts of the run (None: ``jax.process_count()``).

  Raises:
    ConfigError: listing every problem found, each naming its config key and the fix.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  problems: List[str] = []
  for key in ("total_steps", "log_every_steps", "checkpoint.every_steps",
              "checkpoint.keep", "parallel.accum_steps"):
    _positive(config, key, problems)
  par = config.get("parallel") or {}
  mode = par.get("mode", "jit")
  if mode not in parallel.MODES:
    problems.append(f"config.parallel.mode={mode!r}; expected one of {parallel.MODES}.")
  accum = par.get("accum_steps", 1)
  accum = accum if _is_int(accum) and accum >= 1 else 1  # a bad value is reported above
  mesh_devices = None
  try:
    data, fsdp = mesh_shape(par.get("data_axis_size", -1), par.get("fsdp_axis_size", 1),
                            num_devices)
    mesh_devices = data * fsdp
  except ConfigError as e:
    problems.append(str(e))
  if mesh_devices:
    try:
      check_batch_size(config.batch_size, num_devices=mesh_devices, num_processes=num_processes,
                       accum_steps=accum)
    except ConfigError as e:
      problems.append(str(e))
    ev = config.get("eval") or {}
    if ev.get("evaluators") and "batch_size" in ev:
      try:  # the evaluators pad their batches to it; a bad one fails after training
        check_batch_size(ev.batch_size, num_devices=mesh_devices, num_processes=num_processes,
                         key="config.eval.batch_size")
      except ConfigError as e:
        problems.append(str(e))
  if config.get("objective") not in OBJECTIVES:
    problems.append(f"config.objective={config.get('objective')!r}; known objectives: "
                    f"{sorted(OBJECTIVES)}.")
  else:
    try:
      needed, provided, objective = objective_inputs(config)
    except ConfigError as e:
      problems.append(str(e))
    else:
      missing = [k for k in needed if k not in provided]
      if missing:
        fixes = sorted({KEY_FIXES.get(k, f"a data option producing {k!r}") for k in missing})
        problems.append(
            f"config.objective={config.objective!r} reads batch keys {list(needed)}, but "
            f"config.data (source {pipeline.source_of(config.data)!r}) produces "
            f"{list(provided)}: {missing} missing; set {' and '.join(fixes)}.")
      split = objective_base.is_split(objective)
      if accum > 1 and not split:
        problems.append(f"config.parallel.accum_steps={accum} needs an objective split into "
                        f"embed and contrast (objectives.base.Split); {config.objective!r} is "
                        "not: set accum_steps=1.")
      fsdp = par.get("fsdp_axis_size", 1)
      if mesh_devices and fsdp > 1 and not (split and mode == "jit"):
        problems.append(f"config.parallel.fsdp_axis_size={fsdp} needs an "
                        f"objective split into embed and contrast in mode 'jit' "
                        f"({config.objective!r}, mode {mode!r}): set fsdp_axis_size=1.")
  _fail(problems, "Bad configuration, refused before building anything")


# ------------------------------------------------------------------------------------------
# Resuming.

def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _is_shape_key(key: str) -> bool:
  top = key.split(".", 1)[0]
  if top in ("objective", "tokenizer"):
    return True
  if top == "model":
    leaf = key.rsplit(".", 1)[-1]
    return not (leaf in NON_SHAPE_MODEL_KEYS or leaf.endswith("_init"))
  return key in SHAPE_KEYS


def shape_differences(saved: Mapping[str, Any], config) -> List[Tuple[str, Any, Any]]:
  """``[(key, saved value, config value)]`` of the shape-deciding keys (:data:`SHAPE_KEYS`
  and ``objective`` / ``tokenizer`` / ``model``) that differ; ``saved`` is the JSON-decoded
  config of the checkpoint, absent keys are ``"<absent>"``."""
  now = _flat(json.loads(config.to_json_best_effort()))
  before = _flat(saved)
  return [(k, before.get(k, "<absent>"), now.get(k, "<absent>"))
          for k in sorted(set(now) | set(before))
          if _is_shape_key(k) and before.get(k, "<absent>") != now.get(k, "<absent>")]


def saved_config(workdir: str) -> Tuple[Optional[int], Optional[dict]]:
  """``(step, config)`` of ``workdir``'s newest complete checkpoint: the config JSON saved in
  its ``meta`` (else ``<workdir>/config.json``); ``(None, None)`` without a checkpoint."""
  directory = os.path.join(workdir, "checkpoints")
  exists = os.path.isdir(directory)
  if jax.process_count() > 1:
    # Process 0's answer for all: a slower process could otherwise find the directory that
    # process 0, already past this check, has just created, and the two would enter different
    # orbax collectives (a sync_global_devices name mismatch).
    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if not exists:
    return None, None
  mngr = checkpointing.manager_at(directory)
  try:
    step = mngr.latest_step()
    if step is None:
      return None, None
    try:
      text = checkpointing.read_meta(mngr, step).get("config")
    except Exception as e:  # pylint: disable=broad-except  (orbax wraps JSON / IO errors)
      raise ConfigError(
          f"The newest checkpoint {os.path.join(directory, str(step))} has an unreadable meta "
          f"record ({type(e).__name__}: {e}); move that step directory away to resume from "
          "the previous checkpoint, or train in another --workdir.") from e
  finally:
    mngr.close()
  if text is None and os.path.exists(os.path.join(workdir, "config.json")):
    with open(os.path.join(workdir, "config.json")) as f:
      text = f.read()
  if text is None:
    return step, None
  return step, json.loads(text) if isinstance(text, str) else dict(text)


def check_resume(config, workdir: str) -> Optional[int]:
  """Refuses to resume ``workdir``'s newest checkpoint with a config of another model shape.

  Returns:
    The step that will be resumed (None: no checkpoint, a fresh run).

  Raises:
    ConfigError: naming each differing shape key, ``model.image.width: checkpoint 32,
      config 64``, and the fixes (the checkpoint's values, or another workdir).
  """
  step, saved = saved_config(workdir)
  if saved is None:
    return step
  diffs = shape_differences(saved, config)
  if diffs:
    shown = "\n".join(f"  - {k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
    override = " ".join(f"--config.{k}={a!r}" for k, a, _ in diffs[:3] if a != "<absent>")
    raise ConfigError(
        f"{workdir} holds a checkpoint (step {step}) of another model shape:\n{shown}\n"
        f"Resume with the checkpoint's values ({override or 'its config.json'}) or train in "
        "another --workdir.")
  return step


def _meta_flat(tree: Any, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {} if tree is None else {prefix: tree}
  out = {}
  for k, v in items:
    out.update(_meta_flat(v, prefix + (str(k),)))
  return out


def _key_name(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def check_checkpoint_arrays(checkpoint_dir: str, step: int, like_state: Any) -> None:
  """Compares every array of the checkpoint at ``step`` in ``checkpoint_dir`` (a
  ``<workdir>/checkpoints`` directory) with ``like_state`` (arrays or ShapeDtypeStructs),
  reading only the checkpoint's metadata.

  Raises:
    ConfigError: naming each array (``params/image_tower/pos_embed``) missing on either side
      or with another shape or dtype, with both values.
    FileNotFoundError: no state at that step.
    ValueError: its metadata is unreadable (a corrupt checkpoint), naming the directory.
  """
  from etils import epath  # orbax's path library
  import orbax.checkpoint as ocp
  path = epath.Path(checkpoint_dir) / str(step) / "state"
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint state at {path}.")
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(path)
  except Exception as e:  # pylint: disable=broad-except  (JSON / IO errors of a corrupt file)
    raise ValueError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e}); the "
                     "checkpoint is corrupt: move that step directory away to resume from the "
                     "previous one.") from e
  saved = _meta_flat(getattr(metadata, "tree", metadata))
  wanted = {tuple(_key_name(k) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(like_state)[0]}
  problems = []
  order = {"params": 0, "objective_state": 1, "opt_state": 3}  # opt_state mirrors params
  for key in sorted(set(saved) | set(wanted), key=lambda k: (order.get(k[0], 2), k)):
    name = "/".join(key)
    if key not in saved:
      problems.append(f"{name}: not in the checkpoint")
    elif key not in wanted:
      problems.append(f"{name}: in the checkpoint only")
    else:
      a, b = saved[key], wanted[key]
      a_sig = (tuple(a.shape), np.dtype(a.dtype))
      b_sig = (tuple(b.shape), np.dtype(b.dtype))
      if a_sig != b_sig:
        problems.append(f"{name}: checkpoint {a_sig[0]} {a_sig[1]}, config {b_sig[0]} "
                        f"{b_sig[1]}")
  if problems:
    shown = "\n".join(f"  - {p}" for p in problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ConfigError(
        f"The checkpoint at {path} does not fit this config's train state ({len(problems)} "
        f"array(s)):\n{shown}{more}\nIt was made with another model or objective shape: "
        "restore it with its own config (its config.json) or train in another --workdir.")


# ------------------------------------------------------------------------------------------
# Command-line overrides.

def unknown_override(config, argv: Sequence[str], flag_name: str = "config") -> Optional[str]:
  """The message for the first ``--<flag_name>.a.b=value`` of ``argv`` that names no key of
  ``config`` (None if all exist): the full key, the keys that exist there, the closest."""
  for arg in argv:
    if not arg.startswith(f"--{flag_name}."):
      continue
    path = arg[len(flag_name) + 3:].split("=", 1)[0]
    node, walked = config, flag_name
    for part in path.split("."):
      if "[" in part or not hasattr(node, "keys"):
        break
      if part not in node:
        fields = sorted(node.keys())
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f"did you mean {walked}.{close[0]}? Else " if close else ""
        return (f"Unknown config key {walked}.{part} (in {arg}): {walked} has "
                f"{fields}. Fix: {hint}remove the override, or add the field in the config "
                "file (a locked config takes no new keys).")
      node, walked = node[part], f"{walked}.{part}"
  return None


def _explain_override(fv: flags.FlagValues, argv: Sequence[str],
                      name: str = "config") -> Optional[str]:
  """:func:`unknown_override` of the config ``--<name>=FILE[:ARGS]`` names (the config flag
  fails before it holds a value, so the file is loaded again by its own parser)."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None or name not in fv:
    return None
  try:
    config = fv[name].parser.parse(spec)
  except Exception:  # pylint: disable=broad-except  (the original error is shown instead)
    return None
  return unknown_override(config, argv, name)


def parse_flags(argv: List[str], flag_values: Optional[flags.FlagValues] = None) -> List[str]:
  """``app.run(main, flags_parser=config_check.parse_flags)``: absl's parser, exiting with
  status 1 and a message naming the key for an override of a config key that does not
  exist (ml_collections raises a bare ``AttributeError`` there)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    return fv(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:
    message = _explain_override(fv, argv) or str(e)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)
