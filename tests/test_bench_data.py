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


def test_every_benchmark_names_the_cpu_it_ran_on(tmp_path):
    from llava_jax.bench.common import machine_line

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu sse2 avx2 fma avx512f\n\nprocessor\t: 1\n")
    line = machine_line(str(cpuinfo))
    assert line.startswith("cpu: Test CPU 9000 | cores ")
    assert line.endswith("| flags avx2 fma avx512f")
    assert "flags (unknown)" in machine_line(str(tmp_path / "missing"))
