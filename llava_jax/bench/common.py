"""What the benchmarks share: the machine line every run prints first, their small CLIP tower,
the alternating order of the two sides of a comparison, and the optional JSON copy of the
results. Measures nothing itself.

Standard library only: `bench generate --single-thread` sets XLA_FLAGS before jax is imported,
so this module (imported at the top of every benchmark) must not import jax or llava_jax.models.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Iterable, TypeVar

Side = TypeVar("Side")

# The CPU features that change XLA's and torch's kernels (the sandbox's CPU model changes
# between sessions: AVX2 only vs AVX512-BF16 seen), so every result says which it ran on.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine_line(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """"cpu: <model> | cores N | flags avx2 fma ..." from the first processor entry."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo_path, encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass  # not Linux: the model from platform, no flags
    shown = " ".join(f for f in CPU_FEATURES if f in flags) or "(unknown)"
    return f"cpu: {model} | cores {os.cpu_count()} | flags {shown}"


def small_clip(width: int = 256, layers: int = 4, image_size: int = 112) -> dict[str, int]:
    """VisionConfig keywords of the benchmarks' CLIP tower: CLIP-L's shape (MLP 4x wide, heads
    64 wide, 14 px patches) scaled down; the defaults give 64 image tokens."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_layers=layers,
                num_heads=max(1, width // 64), image_size=image_size, patch_size=14)


def alternate(sides: Iterable[Side], repeat: int) -> list[Side]:
    """`sides` in order on even repeats, reversed on odd ones: no side always runs first."""
    sides = list(sides)
    return sides if repeat % 2 == 0 else sides[::-1]


def write_json(path: str | None, results: Any) -> None:
    """Also write the results to `path` (the benchmarks' --json flag), when one is given."""
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)
