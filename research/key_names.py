"""Short readable names for dotted config keys and their values (tables, plot labels).

``optimizer.learning_rate`` is shown as ``learning_rate``: the last component, or the
shortest dotted suffix that no other shown key shares (``model.dropout`` next to
``finetune.dropout``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def short_names(keys: Sequence[str]) -> dict[str, str]:
  """key -> its shortest dotted suffix that is unique among ``keys``."""
  out = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = parts[-n:]
      if not any(o != key and o.split('.')[-n:] == suffix for o in keys):
        break
    out[key] = '.'.join(suffix)
  return out


def format_value(value: Any) -> str:
  """A value for a label: floats in %g (0.003, 1e-05), tuples as (a, b), else str."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (list, tuple)):
    return '(' + ', '.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def varying_keys(settings: Sequence[Mapping[str, Any]]) -> list[str]:
  """The keys whose value differs between settings (missing counts as a value), in
  order of first appearance."""
  keys = list(dict.fromkeys(k for s in settings for k in s))
  return [k for k in keys
          if len({repr(s[k]) if k in s else '<missing>' for s in settings}) > 1]


def describe_parts(setting: Mapping[str, Any], keys: Sequence[str],
                   names: Mapping[str, str] | None = None, sparse: bool = False) -> list[str]:
  """``['d_model=64', 'learning_rate=0.003']`` over ``keys``. A key the setting lacks has
  the config's default: ``key=default``, or left out with ``sparse``."""
  names = names or short_names(keys)
  return [f'{names[k]}={format_value(setting[k]) if k in setting else "default"}'
          for k in keys if k in setting or not sparse]


def describe(setting: Mapping[str, Any], keys: Sequence[str],
             names: Mapping[str, str] | None = None, sparse: bool = False,
             width: int = 0) -> str:
  """The parts of :func:`describe_parts` joined by ', ' (``base`` if none); with
  ``width``, on lines of at most that many characters, broken only between parts."""
  parts = describe_parts(setting, keys, names, sparse)
  if not parts:
    return 'base'
  lines = [parts[0]]
  for p in parts[1:]:
    if width and len(lines[-1]) + 2 + len(p) > width:
      lines[-1] += ','
      lines.append(p)
    else:
      lines[-1] += ', ' + p
  return '\n'.join(lines)
