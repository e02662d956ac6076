"""Resuming past a corrupt checkpoint (checkpoint.on_corrupt), on one process and on two.

A tiny LLaVA trains 4 steps with a checkpoint after every step (the reference run); the
tests copy its workdir without step 4, damage step 3 and resume. Deterministic on CPU, so
the run that falls back to step 2 must end with exactly the reference's parameters.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llava_jax.training import optim
from llava_jax.training import trainer as trainer_lib
from llava_jax.training.config import validate_config
from llava_jax.training.trainer import CheckpointRestoreError, Trainer
from test_train import demo_data, flat, tiny_config  # noqa: F401 -- demo_data is a fixture

# A failed orbax restore leaves tensorstore read futures whose callbacks fire after orbax closed
# its event loop ("RuntimeError: Event loop is closed", reported as unraisable, at a moment
# that depends on the garbage collector). Noise from the library, not a test outcome.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def recovery_config(data, **checkpoint):
    config = tiny_config(data)
    config.checkpoint.every_steps = 1
    config.checkpoint.max_to_keep = 5  # keep every step: the tests pick which to damage
    config.log.tensorboard = False
    for key, value in checkpoint.items():
        config.checkpoint[key] = value
    return config


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """An uninterrupted 4-step run: its workdir (steps 1-4) and final parameters."""
    workdir = tmp_path_factory.mktemp("reference")
    trainer = Trainer(recovery_config(demo_data), str(workdir))
    result = trainer.run()
    assert result["step"] == 4
    return {"workdir": workdir, "result": result,
            "params": flat(optim.merge_params(trainer.trainable, trainer.frozen))}


def stopped_after_step_3(reference, tmp_path) -> Path:
    """The reference workdir as a run that stopped after saving step 3."""
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


def step_dirs(workdir) -> list[str]:
    return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())


def files(directory: Path) -> set[Path]:
    return {p.relative_to(directory) for p in directory.rglob("*") if p.is_file()}


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_params(step_dir: Path) -> None:
    with open(largest_file(step_dir / "params"), "r+b") as handle:
        handle.truncate(100)


def remove_opt_state_file(step_dir: Path) -> None:
    largest_file(step_dir / "opt_state").unlink()


def garbage_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text("not json")


def test_on_corrupt_is_validated(demo_data):
    config = recovery_config(demo_data, on_corrupt="ignore")
    with pytest.raises(ValueError, match=r"checkpoint\.on_corrupt='ignore'"):
        validate_config(config)


def test_errors_are_one_line_without_spec_dumps():
    try:
        try:
            raise ValueError("OUT_OF_RANGE: Error reading \"k/0.0\": byte range [0, 9) "
                             "[source locations='tensorstore/kvstore/x.cc:1']")
        except ValueError as cause:
            raise Exception("Encountered error while reading array index: (slice(0, 2, 1),). "
                            "See full TensorStore details: TensorStore({\n  'base': {}\n})") \
                from cause
    except Exception as error:  # noqa: BLE001
        line = trainer_lib._one_line(error)
    assert line == ("Exception: Encountered error while reading array index: (slice(0, 2, 1),). "
                    "<- ValueError: OUT_OF_RANGE: Error reading \"k/0.0\": byte range [0, 9)")


def test_only_orbax_coroutine_reports_are_dropped():
    passed_on = []
    hook = trainer_lib._drop_orbax_read_errors(passed_on.append)
    namespace = {}
    exec(compile("async def read(): pass", "/venv/site-packages/orbax/checkpoint/serialization.py",
                 "exec"), namespace)

    async def ours():
        pass

    for coroutine in (namespace["read"](), ours()):
        hook(SimpleNamespace(object=coroutine))
        coroutine.close()
    hook(SimpleNamespace(object=None))
    assert [getattr(u.object, "__name__", None) for u in passed_on] == ["ours", None]


# orbax's abandoned read coroutines would each report a spec dump as an unraisable exception.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, item", [(truncate_params, "params"),
                                          (remove_opt_state_file, "opt_state")])
def test_corrupt_newest_step_falls_back_to_the_one_before(demo_data, reference, tmp_path,
                                                          caplog, damage, item):
    workdir = stopped_after_step_3(reference, tmp_path)
    bad = workdir / "checkpoints" / "3"
    damage(bad)
    caplog.set_level(logging.WARNING)
    trainer = Trainer(recovery_config(demo_data), str(workdir))
    result = trainer.run()

    # One line names the step, its path and the error (no tensorstore spec dump).
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    failure = [w for w in warnings if w.startswith("checkpoint step 3 ")]
    assert len(failure) == 1, warnings
    assert str(bad) in failure[0] and "trying step 2" in failure[0]
    assert f'"{bad / item}/"' in failure[0]  # the error names the damaged item's files
    assert "\n" not in failure[0] and "TensorStore({" not in failure[0]
    assert any("resumed from step 2" in w for w in warnings), warnings

    # Steps 3 and 4 were trained again from step 2 and equal the uninterrupted run.
    assert [step for step, _ in result["history"]] == [3, 4]
    assert result["history"] == reference["result"]["history"][-2:]
    params = flat(optim.merge_params(trainer.trainable, trainer.frozen))
    for name, value in reference["params"].items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)

    # The bad step was moved aside, files and all, not overwritten or deleted.
    names = step_dirs(workdir)
    moved = [name for name in names if name.startswith("3.corrupt-")]
    assert names == ["1", "2", "3", *moved, "4"] and len(moved) == 1, names
    assert any(moved[0] in w and str(bad) in w for w in warnings), warnings
    kept, original = (files(workdir / "checkpoints" / moved[0]),
                      files(reference["workdir"] / "checkpoints" / "3"))
    assert kept <= original and len(original - kept) == (damage is remove_opt_state_file)


def test_on_corrupt_fail_stops_naming_the_step(demo_data, reference, tmp_path):
    workdir = stopped_after_step_3(reference, tmp_path)
    bad = workdir / "checkpoints" / "3"
    garbage_meta(bad)
    trainer = Trainer(recovery_config(demo_data, on_corrupt="fail"), str(workdir))
    with pytest.raises(CheckpointRestoreError) as raised:
        trainer.run()
    message = str(raised.value)
    assert f"checkpoint step 3 ({bad}) does not restore: JSONDecodeError" in message
    assert "on_corrupt=fallback" in message and f"delete {bad}" in message
    assert step_dirs(workdir) == ["1", "2", "3"]  # nothing moved, nothing trained


def test_no_step_restores_is_an_error_naming_every_step(demo_data, reference, tmp_path):
    workdir = stopped_after_step_3(reference, tmp_path)
    for step in (1, 2, 3):
        garbage_meta(workdir / "checkpoints" / str(step))
    trainer = Trainer(recovery_config(demo_data), str(workdir))
    with pytest.raises(CheckpointRestoreError) as raised:
        trainer.run()
    message = str(raised.value)
    assert "tried steps 3, 2, 1" in message
    for step in (1, 2, 3):
        assert f"step {step} ({workdir / 'checkpoints' / str(step)}): JSONDecodeError" in message
    assert "Not starting from scratch" in message
    assert step_dirs(workdir) == ["1", "2", "3"]  # never a fresh start over them


# ----- two processes -----

WORKER = """
import json, sys
process_id, port, workdir, data, max_steps, report = sys.argv[1:]
import jax
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(process_id), initialization_timeout=60)
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, TESTS_DIR)
from test_checkpoint_recovery import recovery_config
from llava_jax.training.trainer import Trainer
config = recovery_config(json.loads(data))
config.max_steps = int(max_steps)
trainer = Trainer(config, workdir)
result = trainer.run()
with open(report, "w") as handle:
    json.dump({"step": trainer.step, "history": result["history"]}, handle)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(tmp_path, workdir, data, max_steps: int, name: str):
    """Both processes' ({step, history}, log); fails on a non-zero exit or after 150 s."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("TESTS_DIR", repr(str(TESTS))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    port = _free_port()
    processes, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"{name}-{i}.log")
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(workdir), json.dumps(data),
             str(max_steps), str(tmp_path / f"{name}-{i}.json")],
            cwd=REPO, env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=150) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    return [json.loads((tmp_path / f"{name}-{i}.json").read_text()) for i in range(2)], texts


def test_two_processes_agree_on_the_step_they_resume_from(demo_data, tmp_path):
    workdir = tmp_path / "run"
    data = {key: demo_data[key] for key in ("image_root", "tokenizer_dir", "stage2_json")}
    first, _ = run_two_processes(tmp_path, workdir, data, max_steps=2, name="first")
    assert first[0] == first[1] and [step for step, _ in first[0]["history"]] == [1, 2]
    # Only process 1 reads this file: process 0 alone would resume from step 2.
    (workdir / "checkpoints" / "2" / "data" / "process_1-of-2.json").write_text("{garbage")

    # max_steps=1: resume and stop (training on is the single-process tests' business).
    second, logs = run_two_processes(tmp_path, workdir, data, max_steps=1, name="second")
    assert second[0] == second[1] == {"step": 1, "history": []}, second
    assert "checkpoint step 2 " in logs[0] and "on process 1 (their logs have the error)" \
        in logs[0]
    assert "on process 1: JSONDecodeError" in logs[1]
    names = step_dirs(workdir)  # moved aside once (by process 0), nothing trained
    assert len(names) == 2 and names[0] == "1" and names[1].startswith("2.corrupt-"), names
