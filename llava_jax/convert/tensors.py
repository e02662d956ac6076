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

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Reads one tensor with a positioned read (not a memory map: pages of a map that
        has been read stay resident, so a whole checkpoint would count against memory)."""
        info = self.header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        expected = int(np.prod(info["shape"])) * dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.data_offset + start)
            raw = f.read(end - start)
        if len(raw) != expected or end - start != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated "
                                  f"({len(raw)} of {expected} bytes); the file is incomplete.")
        return np.frombuffer(raw, dtype=dtype).reshape(info["shape"])


class _TorchBinFile:
    """A `pytorch_model*.bin` file, opened lazily with mmap and weights_only."""

    def __init__(self, path: Path):
        try:  # torch is optional (the `torch` extra): only .bin files need it
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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> np.ndarray:
        import torch  # optional dependency, present once __init__ succeeded

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

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (nothing read)."""
        handle, raw_name = self.index[name]
        return handle.shape(raw_name)

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
    """Streams tensors straight into `model-0000k-of-0000n.safetensors` shards plus an index.

    All tensor names, shapes and dtypes are declared up front (`plan`), so each shard's
    header is written before its data and memory holds one tensor at a time. Tensors must
    then be `add`ed in the planned order.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = []
        self.total_bytes = 0
        self._order: list[str] = []
        self._next = 0
        self._file = None
        self._shard_index = -1
        self._remaining_in_shard = 0

    def plan(self, entries: list[tuple[str, tuple[int, ...], object]]) -> None:
        current, current_bytes = [], 0
        for name, shape, dtype in entries:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if current and current_bytes + nbytes > self.max_shard_bytes:
                self.shards.append(current)
                current, current_bytes = [], 0
            current.append((name, tuple(shape), np.dtype(dtype)))
            current_bytes += nbytes
            self.total_bytes += nbytes
        if current:
            self.shards.append(current)
        self._order = [name for shard in self.shards for name, _, _ in shard]

    def shard_name(self, index: int) -> str:
        total = len(self.shards)
        return "model.safetensors" if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"

    def add(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensor {name!r} written out of the planned order")
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        planned = self.shards[self._shard_index][len(self.shards[self._shard_index]) - self._remaining_in_shard]
        if array.shape != planned[1] or array.dtype != planned[2]:
            raise RuntimeError(f"tensor {name!r}: {array.shape} {array.dtype} differs from the plan")
        self._file.write(np.ascontiguousarray(array).tobytes())
        self._remaining_in_shard -= 1
        self._next += 1
        if self._remaining_in_shard == 0:
            self._file.close()

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        entries = self.shards[self._shard_index]
        path = self.directory / self.shard_name(self._shard_index)
        self._file = open(path, "wb")
        _write_header(self._file, [(n, s, d) for n, s, d in entries])
        self._remaining_in_shard = len(entries)

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors written")
        weight_map = {name: self.shard_name(i) for i, shard in enumerate(self.shards)
                      for name, _, _ in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_header(f, entries) -> None:
    to_code = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": to_code[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes a safetensors file (bfloat16 included, which safetensors.numpy cannot)."""
    with open(path, "wb") as f:
        _write_header(f, [(name, a.shape, a.dtype) for name, a in tensors.items()])
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
