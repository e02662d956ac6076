"""JSON / JSONL sources: byte-offset index, cache, and start-up errors naming the position."""

import json
import os

import numpy as np
import pytest

from llava_jax.data import sources
from llava_jax.data.sources import JsonIndex, JsonSource, MalformedJsonError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def records(count):
    out = []
    for index in range(count):
        record = {"id": f"r{index}", "conversations": [
            {"from": "human", "value": "<image>\nQ ]}\",[{ é ✓ " + "x" * (index % 13)},
            {"from": "gpt", "value": "A"}]}
        if index % 5:
            record["image"] = f"{index}.jpg" if index % 7 else [f"{index}a.jpg", f"{index}b.jpg"]
        out.append(record)
    return out


@pytest.mark.parametrize("indent, ensure_ascii", [(None, True), (2, False)])
def test_index_reads_every_record_across_chunk_boundaries(tmp_path, monkeypatch, indent, ensure_ascii):
    monkeypatch.setattr(sources, "_CHUNK_BYTES", 97)  # force many chunk boundaries
    data = records(300)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=ensure_ascii), encoding="utf-8")
    source = JsonSource([str(path)], use_index_cache=False)
    assert len(source) == 300
    for index in (0, 1, 57, 299):
        record = source[index]
        assert record["conversations"] == data[index]["conversations"]
        assert record["_record_index"] == index and record["_image_bytes"] is None
    expected = [0 if i % 5 == 0 else (1 if i % 7 else 2) for i in range(300)]
    np.testing.assert_array_equal(source.num_images, expected)


def test_jsonl_and_multiple_files_concatenate(tmp_path):
    first, second = records(4), records(6)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in first) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(second))
    source = JsonSource([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")])
    assert len(source) == 10
    assert [source[i]["id"] for i in range(10)] == [r["id"] for r in first + second]
    with pytest.raises(IndexError):
        source[10]


def test_index_cache_is_reused_and_invalidated(tmp_path, cache_dir):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records(5)))
    assert len(JsonIndex.load(str(path))) == 5
    cached = list((cache_dir / "json_index").iterdir())
    assert len(cached) == 1
    # Same size and mtime -> served from the cache (a doctored cache proves it).
    np.savez(cached[0], offsets=np.zeros(2, np.int64), lengths=np.ones(2, np.int32),
             num_images=np.zeros(2, np.int16), text_chars=np.zeros(2, np.int32))
    assert len(JsonIndex.load(str(path))) == 2
    path.write_text(json.dumps(records(7)))
    os.utime(path, ns=(1, 1))
    assert len(JsonIndex.load(str(path))) == 7


@pytest.mark.parametrize("text, where", [
    ('[\n{"id": "1"},\n{"id": "2",, }\n]', "line 3, column 12"),
    ('[\n{"id": "1"}\n{"id": "2"}]', "line 3, column 1"),
    ('[\n{"id": "1"},\n{"id": "2"', "line 3"),
    ('{"id": "1"}\n{"id": 2,}\n', "line 2, column 1"),
    ('"just a string"', "line 1, column 1"),
    ('[{"id": "1"}] trailing', "line 1, column 15"),
])
def test_malformed_json_fails_at_start_with_file_and_position(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(MalformedJsonError) as error:
        JsonSource([str(path)], use_index_cache=False)
    assert str(path) in str(error.value) and where in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        JsonSource([str(tmp_path / "nope.json")])


def test_non_object_records_are_marked_for_skipping(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "ok", "conversations": []}, [1, 2], "text"]')
    source = JsonSource([str(path)], use_index_cache=False)
    assert "_not_a_dict" not in source[0]
    assert source[1]["_not_a_dict"] == "list" and source[2]["_not_a_dict"] == "str"


def test_resolve_image_searches_roots_in_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "y.jpg").write_bytes(b"2")
    (tmp_path / "b" / "y.jpg").write_bytes(b"3")
    roots = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert sources.resolve_image("sub/x.jpg", roots) == str(tmp_path / "b" / "sub" / "x.jpg")
    assert sources.resolve_image("y.jpg", roots) == str(tmp_path / "a" / "y.jpg")
    with pytest.raises(FileNotFoundError, match="z.jpg"):
        sources.resolve_image("z.jpg", roots)
