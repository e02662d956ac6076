"""ArrayRecord path: convert LLaVA JSON + images, read back through the same pipeline."""

import json

import numpy as np
import pytest
from absl import flags

pytest.importorskip("array_record", reason="the tfds extra (array_record) is not installed")

from llava_jax.data import default_data_config, make_dataset  # noqa: E402
from llava_jax.data.sources import ArrayRecordSource, JsonSource  # noqa: E402
from llava_jax.data.testing import build_test_tokenizer, numbered_records, write_dataset  # noqa: E402
from llava_jax.data.to_array_record import convert  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ar")
    records, images = numbered_records(25, text_only_every=5)
    records.append({"id": "gone", "image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]})
    paths = write_dataset(str(directory), records, images)
    result = convert([paths["json"]], [paths["image_root"]], str(directory / "out" / "data"),
                     num_shards=3, progress=False)
    return paths, result


def test_converter_writes_shards_and_leaves_out_missing_images(converted):
    paths, result = converted
    assert len(result["paths"]) == 3 and result["paths"][0].endswith("data-00000-of-00003.array_record")
    assert result == {**result, "written": 25, "missing_image": 1}
    source = ArrayRecordSource(result["paths"][0].replace("-00000-of-00003.array_record", ""))
    json_source = JsonSource([paths["json"]], use_index_cache=False)
    assert len(source) == 25
    for index in (0, 7, 24):
        record, original = source[index], json_source[index]
        assert record["conversations"] == original["conversations"]
        if "image" in original:
            with open(f"{paths['image_root']}/{original['image']}", "rb") as handle:
                assert record["_image_bytes"] == [handle.read()]  # bytes kept as encoded
        else:
            assert record["_image_bytes"] == []


def test_pipeline_gives_the_same_batches_from_array_record_and_json(converted, tmp_path):
    paths, result = converted
    tokenizer = build_test_tokenizer()

    def run(**fields):
        config = default_data_config(2)
        config.update(max_length=96, buckets=(96,), max_images_per_row=2, aspect="square",
                      use_index_cache=False, **fields)
        iterator = make_dataset(config, tokenizer, num_image_tokens=4,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                image_size=16, batch_size=2, seed=5, shard_index=0, shard_count=1)
        return list(iterator)

    # The JSON side without the record whose image is missing, as the converter left it out.
    records, _ = numbered_records(25, text_only_every=5)
    json_path = tmp_path / "same.json"
    json_path.write_text(json.dumps(records))
    from_json = run(json_paths=(str(json_path),), image_roots=(paths["image_root"],))
    prefix = result["paths"][0].replace("-00000-of-00003.array_record", "")
    from_array_record = run(array_record_paths=prefix, json_paths=())
    assert len(from_json) == len(from_array_record) > 5
    for a, b in zip(from_json, from_array_record):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_cli_runs(converted, tmp_path, capsys):
    from llava_jax.data import to_array_record

    paths, _ = converted
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["to_array_record", f"--json={paths['json']}", f"--image_root={paths['image_root']}",
                 f"--output={tmp_path}/cli", "--num_shards=2"])
    try:
        to_array_record.main([])
    finally:
        flags.FLAGS.unparse_flags()
        flags.FLAGS.mark_as_parsed()
    assert "wrote 25 records to 2 shard(s) (1 left out: missing image)" in capsys.readouterr().out
    assert len(ArrayRecordSource(f"{tmp_path}/cli")) == 25
