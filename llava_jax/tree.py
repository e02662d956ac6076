"""Nested parameter dicts: flat paths, flatten / unflatten, split by regex, merge.

Parameters everywhere in llava_jax (models, checkpoints, training state, conversion) are
nested dicts mirroring the flax module tree, e.g. `{"language_model": {"norm": {"scale": x}}}`,
addressed by flat paths such as `"language_model/norm/scale"`. This module is the one place
that knows that spelling; it imports nothing of ours (and nothing of JAX), so every floor of
the package can use it.
"""

from __future__ import annotations

import re
from typing import Any, Iterable


def flat_path(key_path: Iterable[Any]) -> str:
    """A JAX key path (DictKey / GetAttrKey / SequenceKey entries) -> "a/b/c"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': x}} -> {'a/b': x} (the inverse of `unflatten`)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict) -> dict:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def split(tree: dict, pattern: str) -> tuple[dict, dict]:
    """(matching, rest): leaves whose flat path the regex `pattern` searches, and the others.

    Both halves are nested dicts; either may be empty.
    """
    regex = re.compile(pattern)
    flat = flatten(tree)
    matching = unflatten({p: v for p, v in flat.items() if regex.search(p)})
    rest = unflatten({p: v for p, v in flat.items() if not regex.search(p)})
    return matching, rest


def merge(first: dict, second: dict) -> dict:
    """Deep union of two disjoint nested dicts (the inverse of `split`)."""
    out = dict(first)
    for key, value in second.items():
        if key in out and isinstance(value, dict):
            out[key] = merge(out[key], value)
        elif key in out:
            raise ValueError(f"parameter {key!r} is in both trees")
        else:
            out[key] = value
    return out
