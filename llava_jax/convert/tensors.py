"""Streaming tensor I/O for PyTorch checkpoints: read one tensor at a time, write shards.

Reading never materialises a whole checkpoint: safetensors files are memory-mapped and
`.bin` files are opened with `torch.load(mmap=True, weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not match the model."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class _SafetensorsFile:
    """Memory-mapped safetensors file: header parsed once, tensors sliced on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
        header.pop("__metadata__", None)
        self.header = header
        self.data_offset = 8 + header_len
        self._mmap = None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        raw = self._mmap[self.data_offset + start:self.data_offset + end]
        expected = int(np.prod(info["shape"])) * np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if raw.size != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated "
                                  f"({raw.size} of {expected} bytes); the file is incomplete.")
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class _TorchBinFile:
    """A `pytorch_model*.bin` file, opened lazily with mmap and weights_only."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{path}: reading .bin checkpoints needs PyTorch: "
                                  "pip install 'llava_jax[torch]' (or torch==2.13.0).") from e
        self.path = path
        try:
            self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; name the file
            raise CheckpointError(f"{path}: cannot be loaded by torch.load ({e}).") from e
        if not isinstance(self.state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(self.state).__name__}.")

    def keys(self):
        return self.state.keys()

    def get(self, name: str) -> np.ndarray:
        import torch

        tensor = self.state[name]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


class TensorReader:
    """All tensors of a checkpoint directory (or single file), by name, read lazily.

    `rename` maps names on disk to canonical names (None drops a tensor).
    """

    def __init__(self, location: str | os.PathLike, rename: Callable[[str], str | None] = lambda n: n,
                 *, pattern_prefix: str | None = None):
        location = Path(location)
        files = _checkpoint_files(location, pattern_prefix)
        self.files = []
        self.index: dict[str, tuple[object, str]] = {}
        for path in files:
            handle = _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchBinFile(path)
            self.files.append(handle)
            for name in handle.keys():
                canonical = rename(name)
                if canonical is None:
                    continue
                if canonical in self.index:
                    raise CheckpointError(f"Tensor {canonical!r} appears twice in {location} "
                                          f"({self.index[canonical][1]!r} and {name!r}).")
                self.index[canonical] = (handle, name)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return sorted(self.index)

    def get(self, name: str) -> np.ndarray:
        handle, raw_name = self.index[name]
        return handle.get(raw_name)

    def source_of(self, name: str) -> str:
        return str(self.index[name][0].path)


def _checkpoint_files(location: Path, prefix: str | None) -> list[Path]:
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise CheckpointError(f"{location}: no such checkpoint file or directory.")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = location / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index_path}: malformed shard index ({e}).") from e
            files = sorted({location / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index_path} lists shards that do not exist: {missing}.")
            return files
    files = sorted(location.glob("*.safetensors")) or sorted(location.glob("*.bin"))
    if prefix:
        files = [f for f in files if f.name.startswith(prefix)]
    files = [f for f in files if f.name not in ("training_args.bin", "optimizer.bin",
                                                "scheduler.bin")]
    if not files:
        raise CheckpointError(f"{location}: no *.safetensors or *.bin weight files found.")
    return files


def cast(array: np.ndarray, dtype, name: str) -> np.ndarray:
    """Casts with an overflow check (e.g. float32 values beyond float16's range)."""
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    with np.errstate(over="ignore"):  # overflow is detected and reported below
        out = array.astype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16:
        src_finite = np.isfinite(array.astype(np.float32))
        if np.any(src_finite & ~np.isfinite(out.astype(np.float32))):
            raise CheckpointError(f"Tensor {name!r} overflows {dtype.name}: values up to "
                                  f"{float(np.abs(array.astype(np.float32)).max()):.3g}. Choose a "
                                  "wider --dtype (float32 or bfloat16).")
    return out


class ShardedSafetensorsWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards plus an index.

    Tensors are buffered until a shard reaches `max_shard_bytes`, so memory stays at about
    one shard. Shards are renamed with the final count in `close()`.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, np.ndarray] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self.buffer and self.buffer_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = np.ascontiguousarray(array)
        self.buffer_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.shards):05d}.tmp"
        write_safetensors(path, self.buffer)
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer:
            self._flush()
        total = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = (self.directory / "model.safetensors" if total == 1
                     else self.directory / f"model-{i + 1:05d}-of-{total:05d}.safetensors")
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes a safetensors file (bfloat16 included, which safetensors.numpy cannot)."""
    to_code = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": to_code[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
