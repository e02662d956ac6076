"""Old module paths (before the training/, inference/, evaluation/, bench/ wings): one release.

`import llava_jax.trainer` and friends still work, with a DeprecationWarning naming the new
path; the alias is the new module itself, so both names share one state. Drop in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "llava_jax.train_config": "llava_jax.training.config",
    "llava_jax.trainer": "llava_jax.training.trainer",
    "llava_jax.optim": "llava_jax.training.optim",
    "llava_jax.metrics": "llava_jax.training.metrics",
    "llava_jax.generation": "llava_jax.inference.generation",
    "llava_jax.scorers": "llava_jax.evaluation.scorers",
    "llava_jax.bench_data": "llava_jax.bench.data",
    "llava_jax.bench_train": "llava_jax.bench.train",
    "llava_jax.bench_generate": "llava_jax.bench.generate",
    "llava_jax.bench_convert": "llava_jax.bench.convert",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in llava_jax 0.3.",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already imported; importlib files it under the old name


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
