"""launch/local.py: N JAX processes on this machine, the multi-host code path on CPU.

The launcher runs as a user runs it (a subprocess, `python launch/local.py ... -- COMMAND`).
Training runs use a tiny LLaVA on 40 demo captions, one image each, unpacked and unshuffled:
process i of n reads records i, i+n, ..., so 2 processes feed the same rows per step as 1
(in another order, which the loss and gradients do not depend on) and must give the same
losses and parameters. A run costs 30-60 s on a 2-core machine (mostly compilation); the
failure tests use 1 device per process, which compiles faster.
"""

import importlib.util
import json
import os
import queue
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = str(REPO / "launch" / "local.py")
TIMEOUT = 600

TINY_CONFIG = '''
import ml_collections
from llava_jax.training import optim
from llava_jax.training.config import default_config


def get_config(arg=None):
    c = default_config(1)
    c.trainable = optim.STAGE_TRAINABLE[2]  # projector + LLM: most parameters change
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict({{
        "vision": {{"hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                   "num_heads": 2, "image_size": 16, "patch_size": 8}},
        "text": {{"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                 "num_kv_heads": 2}}}})
    c.model.vocab_from_tokenizer = True
    c.model.tokenizer_dir = {tokenizer_dir!r}
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.data.json_paths = ({json_path!r},)
    c.data.image_roots = ({image_root!r},)
    c.data.packing = False  # one sample a row, in record order: the same rows for 1 or 2 shards
    c.data.shuffle = False
    c.data.buckets = (64,)
    c.data.max_length = 64
    c.data.num_epochs = int(arg) if arg else None  # `--config=FILE:1`: one epoch
    c.data.read_threads = 1
    c.mesh.fsdp = -1  # parameters sharded over all 8 devices, across the processes
    c.optim.global_batch_size = 8
    c.optim.total_steps = 4
    c.optim.learning_rate = 1e-3
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.distributed = "auto"  # launch/local.py's variables start jax.distributed
    return c
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The config file of the tiny runs (and its data: the first 40 demo captions)."""
    from llava_jax.data import demo

    prepared = demo.prepare()
    root = tmp_path_factory.mktemp("tiny")
    records = json.loads(Path(prepared["stage1_json"]).read_text())[:40]
    (root / "data.json").write_text(json.dumps(records))
    config = root / "tiny_config.py"
    config.write_text(TINY_CONFIG.format(
        tokenizer_dir=prepared["tokenizer_dir"], json_path=str(root / "data.json"),
        image_root=prepared["image_root"]))
    return {"config": str(config), "root": root, "records": records,
            "image_root": prepared["image_root"], "tokenizer_dir": prepared["tokenizer_dir"]}


def launcher(processes, devices, *command, extra=()):
    return [sys.executable, LOCAL, f"--num-processes={processes}",
            f"--devices-per-process={devices}", *extra, "--", *command]


def train_command(config, workdir, *overrides):
    return [sys.executable, "-m", "llava_jax.train", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def run_launcher(argv, timeout=TIMEOUT):
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    done.wall_s = time.monotonic() - started
    return done


def tensorboard_scalars(workdir, tag):
    """{step: value} of one scalar from every TensorBoard event file of a workdir."""
    from tensorboardX.proto import event_pb2

    values = {}
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # TFRecord: length, its crc, payload, payload crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def saved_params(workdir):
    import jax
    from flax import nnx

    from llava_jax import checkpoint as ckpt
    from llava_jax.tree import flat_path

    model = ckpt.load_pretrained(workdir).model
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {flat_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


# ----- flags -----

@pytest.mark.parametrize("args, message", [
    (["--num-processes=0", "--", "true"], "--num-processes must be at least 1; got 0"),
    (["--num-processes=2", "--devices-per-process=0", "--", "true"],
     "--devices-per-process must be at least 1; got 0"),
    (["--num-processes=two", "--", "true"], "argument --num-processes: invalid int value"),
    (["--devices-per-process=2", "--", "true"], "the following arguments are required: "
                                                "--num-processes"),
    (["--num-processes=2"], "give the training command after `--`"),
    (["--num-processes=2", "--coordinator-port=80", "--", "true"],
     "--coordinator-port must be in 1024..65535; got 80"),
    (["--num-processes=2", "--kill-timeout=0", "--", "true"], "--kill-timeout must be positive"),
    (["--num-processes=2", "--env=1X=2", "--", "true"], "--env expects KEY=VALUE"),
    (["--num-processes=2", "--env=LLAVA_JAX_PROCESS_ID=1", "--", "true"],
     "the launcher sets LLAVA_JAX_PROCESS_ID itself"),
    (["--num-processes=2", "--", "no-such-command-llava"],
     "'no-such-command-llava' is not an executable or on PATH"),
])
def test_bad_flags_are_clear_errors(args, message):
    done = subprocess.run([sys.executable, LOCAL, *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr.replace("must be a positive number of seconds",
                                          "must be positive"), done.stderr


def test_dry_run_prints_each_process_environment():
    done = subprocess.run(
        [sys.executable, LOCAL, "--num-processes=2", "--devices-per-process=3",
         "--coordinator-port=23456", "--env=XLA_FLAGS=--xla_foo --xla_force_host_platform_"
         "device_count=9", "--env=A=b c", "--dry-run", "--", "python", "-m", "x", "--y=1 2"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# 2 processes on this machine, coordinator 127.0.0.1:23456"
    for index in (0, 1):
        argv = shlex.split(lines[lines.index(f"# process {index}") + 1])
        assert argv[0] == "env" and argv[-4:] == ["python", "-m", "x", "--y=1 2"]
        env = dict(item.split("=", 1) for item in argv[1:-4])
        assert env == {
            "XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=3", "A": "b c",
            "JAX_COORDINATOR_ADDRESS": "127.0.0.1:23456", "LLAVA_JAX_NUM_PROCESSES": "2",
            "LLAVA_JAX_PROCESS_ID": str(index), "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "3", "PYTHONUNBUFFERED": "1"}


def test_launcher_and_sharding_agree_on_the_variables():
    from launch import local

    from llava_jax import sharding

    assert (local.NUM_PROCESSES_ENV, local.PROCESS_ID_ENV) == (
        sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"LLAVA_JAX_NUM_PROCESSES": "2", "LLAVA_JAX_PROCESS_ID": "1",
      "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, (2, 1)),
    ({"LLAVA_JAX_NUM_PROCESSES": "2"}, "set both"),
    ({"LLAVA_JAX_NUM_PROCESSES": "2", "LLAVA_JAX_PROCESS_ID": "x",
      "JAX_COORDINATOR_ADDRESS": "h:1"}, "must be integers"),
    ({"LLAVA_JAX_NUM_PROCESSES": "2", "LLAVA_JAX_PROCESS_ID": "2",
      "JAX_COORDINATOR_ADDRESS": "h:1"}, "0 <= process id < process count"),
    ({"LLAVA_JAX_NUM_PROCESSES": "2", "LLAVA_JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_launcher_environment_is_detected_and_checked(env, expected):
    from llava_jax import sharding

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)):
            sharding.launcher_processes(env)
    else:
        assert sharding.launcher_processes(env) == expected


SIGNAL_CHILD = """
import os, signal, sys, time
def on_term(*_):
    print("got SIGTERM", flush=True)
    if sys.argv[1] == "exit":
        sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["exit", "ignore"])
def test_signals_are_forwarded_and_a_second_one_kills(mode):
    """SIGTERM to the launcher reaches every process; a second SIGTERM kills them."""
    argv = [sys.executable, LOCAL, "--num-processes=2", "--", sys.executable, "-c",
            SIGNAL_CHILD, mode]
    process, pids, output, lines = _start_and_wait_for(argv, r"\[p1\] ready", timeout=60)
    while not any("[p0] ready" in line for line in output):
        output.append(lines.get(timeout=30))
    process.send_signal(signal.SIGTERM)
    if mode == "ignore":
        while sum("got SIGTERM" in line for line in output) < 2:
            output.append(lines.get(timeout=30))
        process.send_signal(signal.SIGTERM)
    log, elapsed = _rest(process, lines, output, timeout=30)
    assert "[p0] got SIGTERM" in log and "[p1] got SIGTERM" in log, log
    assert "SIGTERM: forwarding it to all processes" in log
    if mode == "exit":
        assert process.returncode == 7, log
        assert "stopped on request (exit codes p0: 7, p1: 7)" in log
    else:
        assert "SIGTERM again: killing all processes" in log
        assert process.returncode == 128 + signal.SIGKILL, log
    assert elapsed < 20


# ----- training -----

def test_two_processes_train_like_one_and_resume(tiny, tmp_path):
    """1 x 8 devices, 4 steps == 2 x 4 devices, 2 steps + resume for 2 more (same workdir)."""
    one = tmp_path / "one"
    done = run_launcher(launcher(1, 8, *train_command(tiny["config"], one)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"1 process x 8 devices, 4 steps: {done.wall_s:.1f} s")

    two = tmp_path / "two"
    first = run_launcher(launcher(2, 4, *train_command(tiny["config"], two,
                                                       "--config.max_steps=2")))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    print(f"2 processes x 4 devices, 2 steps: {first.wall_s:.1f} s")
    out = first.stdout
    assert "[p0] " in out and "[p1] " in out
    for index in (0, 1):
        assert f"[p{index}] " in out and f"process {index} of 2, 4 local / 8 global devices" in out
    assert "all 2 processes exited with code 0" in first.stderr
    assert checkpoint_steps(two) == [2]

    resumed = run_launcher(launcher(2, 4, *train_command(tiny["config"], two)))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    print(f"2 processes x 4 devices, resumed for 2 steps: {resumed.wall_s:.1f} s")
    assert re.search(r"\[p0\] .*resumed from .* at step 2", resumed.stdout)
    assert re.search(r"\[p1\] .*resumed from .* at step 2", resumed.stdout)
    assert checkpoint_steps(two) == [2, 4]

    losses_one, losses_two = (tensorboard_scalars(w, "loss") for w in (one, two))
    assert sorted(losses_one) == sorted(losses_two) == [1, 2, 3, 4], (losses_one, losses_two)
    for step, loss in losses_one.items():
        assert abs(loss - losses_two[step]) <= 1e-5, (losses_one, losses_two)
    params_one, params_two = saved_params(one), saved_params(two)
    assert params_one.keys() == params_two.keys()
    changed = 0
    for name, value in params_one.items():
        np.testing.assert_allclose(params_two[name], value, rtol=0, atol=1e-6, err_msg=name)
        changed += not name.startswith("vision_tower")
    assert changed > 10


def _read_lines(stream, lines):
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _start_and_wait_for(argv, pattern, timeout=TIMEOUT):
    """Start the launcher; return (process, pids by index, output so far, line queue)."""
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    output, deadline = [], time.monotonic() + timeout
    while not any(re.search(pattern, line) for line in output[-5:]):
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never saw {pattern!r}:\n" + "".join(output[-60:]))
        output.append(line)
    pids = dict(re.findall(r"p(\d+)=(\d+)", "".join(output)))
    return process, {int(k): int(v) for k, v in pids.items()}, output, lines


def _rest(process, lines, output, timeout):
    started = time.monotonic()
    process.wait(timeout=timeout)
    elapsed = time.monotonic() - started
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    return "".join(output), elapsed


def test_a_signal_death_is_blamed_over_the_error_exits_it_caused(monkeypatch):
    """Seen dead in the same poll: the killed peer is the cause, not the gloo error it caused."""
    spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
    local = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(REPO / "launch"))  # as `python launch/local.py` has it
    spec.loader.exec_module(local)
    assert local.root_cause([(0, 1), (1, -signal.SIGKILL)]) == (1, -signal.SIGKILL)
    assert local.root_cause([(2, -signal.SIGSEGV), (3, -signal.SIGKILL)]) == (2, -signal.SIGSEGV)
    assert local.root_cause([(1, 3), (0, 2)]) == (0, 2)


def test_killed_process_stops_the_job_quickly(tiny, tmp_path):
    """kill -9 of process 1 mid-training: the launcher names it and ends everything < 60 s."""
    argv = launcher(2, 1, *train_command(tiny["config"], tmp_path,
                                         "--config.optim.total_steps=1000",
                                         "--config.checkpoint.every_steps=1000"),
                    extra=["--kill-timeout=5"])
    process, pids, output, lines = _start_and_wait_for(argv, r"\[p0\] .*step 2/1000")
    os.kill(pids[1], signal.SIGKILL)
    log, elapsed = _rest(process, lines, output, timeout=120)
    print(f"launcher exit {elapsed:.1f} s after kill -9 of process 1")
    assert process.returncode == 128 + signal.SIGKILL, log[-3000:]
    assert elapsed < 60, log[-3000:]
    assert f"process 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL)" in log
    assert "FAILED: process 1 was killed by signal 9 (SIGKILL)" in log
    for pid in pids.values():  # nothing left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_to_one_process_stops_all_at_the_same_step(tiny, tmp_path):
    """SIGTERM reaching only process 1: both agree, save one checkpoint jointly, exit 143."""
    argv = launcher(2, 1, *train_command(tiny["config"], tmp_path,
                                         "--config.optim.total_steps=1000",
                                         "--config.checkpoint.every_steps=1000"))
    process, pids, output, lines = _start_and_wait_for(argv, r"\[p0\] .*step 2/1000")
    os.kill(pids[1], signal.SIGTERM)
    log, elapsed = _rest(process, lines, output, timeout=300)
    print(f"launcher exit {elapsed:.1f} s after SIGTERM to process 1")
    assert process.returncode == 143, log[-3000:]
    saved = [int(m) for m in re.findall(r"\[p\d\] .*SIGTERM: saved step (\d+)", log)]
    assert len(saved) == 2 and saved[0] == saved[1] >= 2, log[-3000:]
    assert checkpoint_steps(tmp_path) == [saved[0]]
    meta = json.loads((tmp_path / "checkpoints" / str(saved[0]) / "meta" / "metadata").read_text())
    assert meta["step"] == saved[0]


def test_exception_in_one_process_is_reported_not_waited_on(tiny, tmp_path):
    """A data error on process 1 only (data.on_error=raise): it exits at once, the job ends."""
    records = list(tiny["records"])
    records[2 * 3 + 1] = dict(records[7], image="missing.png")  # process 1's 4th record
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    argv = launcher(2, 1, *train_command(tiny["config"], tmp_path / "run",
                                         f"--config.data.json_paths=('{data}',)",
                                         "--config.data.on_error=raise"),
                    extra=["--kill-timeout=5"])
    done = run_launcher(argv)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "FAILED: process 1 exited with code 1" in done.stderr, log[-3000:]
    assert re.search(r"\[p1\] .*missing\.png", done.stdout), log[-3000:]
    assert "process 1 of 2 failed; exiting at once" in done.stdout
    print(f"data error on process 1: launcher exit after {done.wall_s:.1f} s")


# ----- evaluation -----

def test_eval_over_two_processes_merges_the_answers_of_one(tmp_path):
    """`python -m llava_jax.eval` as 2 processes: shard files merged = the 1-process answers."""
    from llava_jax.checkpoint import save_model
    from llava_jax.data import demo
    from llava_jax.models.config import get_preset
    from llava_jax.models.llava import create_model

    tokenizer = demo.load_tokenizer()
    config = get_preset("tiny", text={"vocab_size": len(tokenizer)},
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=tokenizer.pad_token_id)
    checkpoint = save_model(create_model(config, seed=0), tmp_path / "model", tokenizer=tokenizer)

    def command(output):
        return [sys.executable, "-m", "llava_jax.eval", "--task=demo",
                f"--checkpoint={checkpoint}", f"--output={output}", "--limit=8",
                "--batch-size=4", "--max-new-tokens=4", "--no-progress"]

    one = tmp_path / "one" / "answers.jsonl"
    single = subprocess.run(command(one), cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two" / "answers.jsonl"
    sharded = run_launcher(launcher(2, 1, *command(two)))
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    print(f"eval, 2 processes: {sharded.wall_s:.1f} s")
    assert (tmp_path / "two" / "answers.0-of-2.jsonl").exists()
    assert (tmp_path / "two" / "answers.1-of-2.jsonl").exists()
    answers_one = [json.loads(line) for line in one.read_text().splitlines()]
    answers_two = [json.loads(line) for line in two.read_text().splitlines()]
    assert len(answers_one) == 8
    assert answers_two == answers_one
    results = json.loads((tmp_path / "two" / "answers_results.json").read_text())
    assert results["num_examples"] == 8


def test_processes_stop_together_when_one_shard_runs_out(tiny, tmp_path):
    """Shards of unequal size (process 1's last records are bad): all stop at the same step."""
    records = [dict(r) for r in tiny["records"]]
    for index in range(17, 40, 2):  # process 1 keeps records 1, 3, ..., 15: 2 batches of 4
        records[index]["image"] = "missing.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    done = run_launcher(launcher(2, 1, *train_command(
        tiny["config"] + ":1", tmp_path / "run", f"--config.data.json_paths=('{data}',)",
        "--config.optim.total_steps=10")), timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for index in (0, 1):
        assert re.search(rf"\[p{index}\] .*stage 1: data exhausted at step 2/10", done.stdout), \
            log[-3000:]
    assert checkpoint_steps(tmp_path / "run") == [2]
    print(f"uneven shards: {done.wall_s:.1f} s")
