"""`python -m llava_jax.bench {data,train,generate,convert,serve} [flags]`: speed and memory.

Each benchmark measures llava_jax against its PyTorch / transformers counterpart in the
same run (alternating sides, medians, ratios), so numbers from this noisy machine stay
comparable. Results go to stdout; BUILD_NOTES.md records them with the command.
"""

import importlib
import sys

from llava_jax.bench.common import machine_line

BENCHMARKS = {
    "data": "llava_jax.bench.data",
    "train": "llava_jax.bench.train",
    "generate": "llava_jax.bench.generate",
    "convert": "llava_jax.bench.convert",
    "serve": "llava_jax.bench.serve",  # the server's clients against each other, not PyTorch
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nusage: python -m llava_jax.bench {{{','.join(BENCHMARKS)}}} [flags]", file=sys.stderr)
        return 2
    print(machine_line(), flush=True)  # numbers are only comparable on the same CPU
    module = importlib.import_module(BENCHMARKS[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
