"""Smoke test of the data benchmark (numbers are not asserted: timing belongs in the bench)."""

import pytest

pytest.importorskip("skimage")


def test_bench_data_runs_and_reports(capsys):
    from llava_jax.bench import data as bench_data

    results = bench_data.main(["--samples=2", "--rounds=1", "--efficiency_samples=800",
                               "--index_records=300", "--tokenizer="])
    efficiency = results["token_efficiency"]
    assert efficiency["packing"] > efficiency["pad_to_longest"]
    assert results["index"]["cold"]["records"] == results["index"]["cached"]["records"] == 300
    assert results["preprocessing"]["ours"] > 0 and results["preprocessing"]["transformers"] > 0
    assert "real tokens" in capsys.readouterr().out
