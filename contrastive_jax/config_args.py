"""Parsing of the ``FILE:ARGS`` part of ``--config configs/x.py:ARGS`` (big_vision style)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``"size=small,steps=100"`` -> ConfigDict, typed like ``defaults``; unknown keys fail.

  A bare word ``w`` means ``w=True`` for a boolean default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out
