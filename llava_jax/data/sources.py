"""Random-access sources of raw LLaVA records: JSON / JSONL files with image folders, or ArrayRecord.

A LLaVA JSON file is one big array (`llava_v1_5_mix665k.json`: 665K records, ~1 GB). Holding
665K parsed dicts costs several GB per grain worker, so `JsonIndex` scans the file once with
the C JSON decoder, chunk by chunk, and keeps only each record's byte offset and length (plus
its image count and text size for length estimates): ~20 bytes a record. A record is then one
`pread` + `json.loads` away. The index is cached next to nothing: under
`$LLAVA_JAX_CACHE/json_index/` (default ~/.cache/llava_jax), keyed by path, size and mtime.

Every source returns the same raw record: the JSON dict as written ({"id", "image"?,
"conversations"}) plus "_image_bytes": a list of encoded images (ArrayRecord) or None (read the
files named in "image" from the image roots). Malformed records are returned as they are; the
pipeline decides what to skip. A file that is not valid JSON fails at start-up with
`MalformedJsonError` naming the file, line, column and byte offset.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import glob
import json
import os
import re
import struct
from typing import Any, Sequence

import numpy as np

_CHUNK_BYTES = 4 << 20
# A decode error further than this from the end of the buffer cannot be "record continues in
# the next chunk": it is a real syntax error (no LLaVA string value is this long).
_MAX_RECORD_BYTES = 64 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class MalformedJsonError(ValueError):
    """The data file is not valid JSON / JSONL; the message names the file and position."""


def cache_root() -> str:
    """$LLAVA_JAX_CACHE, else ~/.cache/llava_jax."""
    return os.environ.get("LLAVA_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llava_jax"
    )


def record_image_names(record: Any) -> list:
    """The image file names of a record: "image" as a list, [] when absent."""
    if not isinstance(record, dict) or record.get("image") is None:
        return []
    images = record["image"]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _text_chars(record: Any) -> int:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return 0
    return sum(
        len(turn.get("value", "")) if isinstance(turn, dict) and isinstance(turn.get("value"), str) else 0
        for turn in record["conversations"]
    )


def _position(path: str, byte_offset: int) -> str:
    """"line L, column C (byte B)" of a byte offset, counting lines by streaming the file."""
    line, line_start, seen = 1, 0, 0
    with open(path, "rb") as handle:
        while seen < byte_offset:
            block = handle.read(min(_CHUNK_BYTES, byte_offset - seen))
            if not block:
                break
            newlines = block.count(b"\n")
            if newlines:
                line += newlines
                line_start = seen + block.rindex(b"\n") + 1
            seen += len(block)
    return f"line {line}, column {byte_offset - line_start + 1} (byte {byte_offset})"


class JsonIndex:
    """Byte offsets of the records of one JSON-array or JSONL file.

    Attributes (numpy, one entry per record): offsets int64, lengths int32 (bytes),
    num_images int16, text_chars int32.
    """

    def __init__(self, path: str, offsets, lengths, num_images, text_chars):
        self.path = path
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int32)
        self.num_images = np.asarray(num_images, np.int16)
        self.text_chars = np.asarray(text_chars, np.int32)

    @staticmethod
    def _columns():
        """Compact growable columns for a scan (Python lists of ints cost ~5x more memory)."""
        return array.array("q"), array.array("i"), array.array("h"), array.array("i")

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def load(cls, path: str, use_cache: bool = True) -> "JsonIndex":
        """Index `path`, reusing a cached index when the file is unchanged."""
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LLaVA data file not found: {path}")
        stat = os.stat(path)
        key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        cache_file = os.path.join(cache_root(), "json_index", key + ".npz")
        if use_cache and os.path.isfile(cache_file):
            try:
                with np.load(cache_file) as cached:
                    return cls(path, **{name: cached[name] for name in cached.files})
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry: rebuild it
        index = cls._scan(path)
        if use_cache:
            try:
                os.makedirs(os.path.dirname(cache_file), exist_ok=True)
                temporary = f"{cache_file}.{os.getpid()}.tmp.npz"
                np.savez(temporary, offsets=index.offsets, lengths=index.lengths,
                         num_images=index.num_images, text_chars=index.text_chars)
                os.replace(temporary, cache_file)
            except OSError:
                pass  # read-only home: work without a cache
        return index

    @classmethod
    def _scan(cls, path: str) -> "JsonIndex":
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            raise MalformedJsonError(f"{path}: starts with a UTF-8 byte-order mark; re-save without it")
        if head[:1] == b"[":
            return cls._scan_array(path)
        if head[:1] == b"{":
            return cls._scan_lines(path)
        raise MalformedJsonError(
            f"{path}: expected a JSON array ('[' ...) or JSON lines ('{{' ...) at "
            f"{_position(path, 0)}"
        )

    @classmethod
    def _scan_lines(cls, path: str) -> "JsonIndex":
        offsets, lengths, num_images, text_chars = cls._columns()
        offset = 0
        with open(path, "rb") as handle:
            for line in handle:
                stripped = line.strip()
                if stripped:
                    try:
                        record = json.loads(stripped)
                    except ValueError as error:
                        raise MalformedJsonError(
                            f"{path}: invalid JSON line at {_position(path, offset)}: {error}"
                        ) from None
                    offsets.append(offset + line.index(stripped[:1]))
                    lengths.append(len(stripped))
                    num_images.append(len(record_image_names(record)))
                    text_chars.append(_text_chars(record))
                offset += len(line)
        return cls(path, offsets, lengths, num_images, text_chars)

    @classmethod
    def _scan_array(cls, path: str) -> "JsonIndex":
        """Walk the top-level array with `raw_decode`, one chunk of the file at a time."""
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        offsets, lengths, num_images, text_chars = cls._columns()
        text, eof = "", False
        pos = 0  # parse position in `text`
        byte_pos = 0  # byte offset of text[pos]

        with open(path, "rb") as handle:

            def read_more():
                nonlocal text, pos, eof
                block = handle.read(_CHUNK_BYTES)
                eof = not block
                try:
                    text = text[pos:] + utf8.decode(block, final=eof)
                except UnicodeDecodeError as error:
                    raise MalformedJsonError(f"{path}: not UTF-8 near byte {byte_pos}: {error}") from None
                pos = 0

            def advance(new_pos):
                nonlocal pos, byte_pos
                piece = text[pos:new_pos]
                byte_pos += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
                pos = new_pos

            def skip_whitespace():
                while True:
                    advance(_WHITESPACE.match(text, pos).end())
                    if pos < len(text) or eof:
                        return
                    read_more()

            def fail(message):
                raise MalformedJsonError(f"{path}: {message} at {_position(path, byte_pos)}")

            read_more()
            skip_whitespace()
            if text[pos : pos + 1] != "[":
                fail("expected '['")
            advance(pos + 1)
            expect_value = True
            first = True
            while True:
                skip_whitespace()
                if pos >= len(text):
                    fail("unexpected end of file inside the top-level array")
                char = text[pos]
                if char == "]" and (first or not expect_value):
                    advance(pos + 1)
                    break
                if not expect_value:
                    if char != ",":
                        fail(f"expected ',' or ']' between records, found {char!r}")
                    advance(pos + 1)
                    expect_value = True
                    continue
                while True:
                    try:
                        record, end = decoder.raw_decode(text, pos)
                        if end == len(text) and not eof:
                            raise ValueError("a number may continue in the next chunk")
                        break
                    except ValueError as error:
                        error_pos = getattr(error, "pos", len(text))
                        if eof or len(text) - error_pos > _MAX_RECORD_BYTES:
                            advance(error_pos)
                            fail(f"invalid JSON ({getattr(error, 'msg', error)})")
                        read_more()
                start_byte = byte_pos
                advance(end)
                offsets.append(start_byte)
                lengths.append(byte_pos - start_byte)
                num_images.append(len(record_image_names(record)))
                text_chars.append(_text_chars(record))
                expect_value, first = False, False
            skip_whitespace()
            if pos < len(text):
                fail("unexpected data after the top-level array")
        return cls(path, offsets, lengths, num_images, text_chars)


def _as_record(value: Any, record_index: int, image_bytes) -> dict:
    """The raw record dict with bookkeeping keys ("_record_index", "_image_bytes"); a JSON value
    that is not an object becomes {"_not_a_dict": type name} so the pipeline can skip it."""
    record = value if isinstance(value, dict) else {"_not_a_dict": type(value).__name__}
    record["_record_index"] = record_index
    record["_image_bytes"] = image_bytes
    return record


class JsonSource:
    """Records of one or more LLaVA JSON / JSONL files, in file order (grain data source)."""

    def __init__(self, paths: Sequence[str], use_index_cache: bool = True):
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ValueError("JsonSource needs at least one JSON path (data.json_paths)")
        self._indexes = [JsonIndex.load(path, use_index_cache) for path in paths]
        self._starts = np.cumsum([0] + [len(index) for index in self._indexes])
        self._descriptors: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_images(self) -> np.ndarray:
        """int16[len]: images per record, from the index (no parsing)."""
        return np.concatenate([index.num_images for index in self._indexes])

    @property
    def text_chars(self) -> np.ndarray:
        return np.concatenate([index.text_chars for index in self._indexes])

    def __getitem__(self, record_index: int) -> dict:
        record_index = int(record_index)
        if not 0 <= record_index < len(self):
            raise IndexError(f"record {record_index} out of range [0, {len(self)})")
        file_index = int(np.searchsorted(self._starts, record_index, side="right") - 1)
        index = self._indexes[file_index]
        local = record_index - int(self._starts[file_index])
        descriptor = self._descriptors.get(file_index)
        if descriptor is None:  # opened lazily: sources are pickled into grain workers
            descriptor = self._descriptors[file_index] = os.open(index.path, os.O_RDONLY)
        data = os.pread(descriptor, int(index.lengths[local]), int(index.offsets[local]))
        return _as_record(json.loads(data), record_index, None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_descriptors"] = {}
        return state

    def __del__(self):
        for descriptor in getattr(self, "_descriptors", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# ArrayRecord: one record = uint32 header length | JSON header | encoded image bytes ...

_HEADER_LENGTH = struct.Struct("<I")


def encode_array_record(record: dict, image_bytes: Sequence[bytes]) -> bytes:
    """Serialize a LLaVA record and its encoded images into one ArrayRecord entry."""
    header = {key: value for key, value in record.items() if not key.startswith("_")}
    header["_image_byte_lengths"] = [len(data) for data in image_bytes]
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return b"".join([_HEADER_LENGTH.pack(len(encoded)), encoded, *image_bytes])


def decode_array_record(data: bytes) -> dict:
    """Inverse of `encode_array_record`: the record dict with "_image_bytes" filled."""
    (header_length,) = _HEADER_LENGTH.unpack_from(data)
    start = _HEADER_LENGTH.size
    record = json.loads(data[start : start + header_length])
    cursor = start + header_length
    images = []
    for length in record.pop("_image_byte_lengths"):
        images.append(bytes(data[cursor : cursor + length]))
        cursor += length
    record["_image_bytes"] = images
    return record


def _require_array_record():
    try:
        # Optional dependency (the `tfds` extra): imported only when ArrayRecord data are used.
        from array_record.python import array_record_data_source  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "ArrayRecord data needs the `array_record` package: pip install 'llava_jax[tfds]'"
        ) from error
    return array_record_data_source


def array_record_paths(pattern_or_paths) -> list[str]:
    """Shard files from a list, a directory, or a glob / prefix ("out" -> out-*.array_record)."""
    if isinstance(pattern_or_paths, (list, tuple)):
        return [str(path) for path in pattern_or_paths]
    path = str(pattern_or_paths)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.array_record")))
    elif any(char in path for char in "*?["):
        found = sorted(glob.glob(path))
    elif os.path.isfile(path):
        found = [path]
    else:
        found = sorted(glob.glob(path + "-*-of-*.array_record"))
    if not found:
        raise FileNotFoundError(f"no ArrayRecord shards match {path!r}")
    return found


class ArrayRecordSource:
    """Records written by `python -m llava_jax.data.to_array_record` (grain data source)."""

    def __init__(self, paths):
        self._paths = array_record_paths(paths)
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            module = _require_array_record()
            self._source = module.ArrayRecordDataSource(self._paths)
        return self._source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, record_index: int) -> dict:
        record = decode_array_record(self._open()[int(record_index)])
        return _as_record(record, int(record_index), record.pop("_image_bytes"))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None  # reopened in each worker
        return state


def resolve_image(name: str, image_roots: Sequence[str]) -> str:
    """Path of image `name`: absolute as is, else the first root that has it."""
    if os.path.isabs(name):
        if os.path.isfile(name):
            return name
    else:
        for root in image_roots:
            candidate = os.path.join(root, name)
            if os.path.isfile(candidate):
                return candidate
    raise FileNotFoundError(f"image {name!r} not found under image roots {list(image_roots)}")
