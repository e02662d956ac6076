"""Tests for launch/tpu_vm.py and launch/slurm_gpu.py.

The launchers run as subprocesses, as a user would run them. Dry runs are checked command by
command; the real code paths run against stand-in `gcloud`, `sbatch`, `srun` and `scontrol`
scripts put first on PATH, and one test runs the generated sbatch script with two real JAX
processes on CPU to check the distributed environment it sets up.
"""

import importlib.util
import os
import re
import shlex
import socket
import stat
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO_ROOT, "launch", "tpu_vm.py")
SLURM_GPU = os.path.join(REPO_ROOT, "launch", "slurm_gpu.py")

TRAIN = [
    "python", "-m", "llava_jax.train", "--config=configs/finetune.py:7b",
    "--workdir=gs://bucket/run1", "--config.note=two words, 'quoted'",
]  # fmt: skip


def run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=60
    )


def write_executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def parse_plan(stdout):
    """{step title: argv} from a tpu_vm.py dry run (`# N. title` then one shell command)."""
    headers = list(re.finditer(r"^# \d+\. (.*)$", stdout, flags=re.M))
    plan = {}
    for header, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(stdout)
        plan[header.group(1)] = shlex.split(stdout[header.end() : end])
    return plan


def step(plan, prefix):
    matches = [argv for title, argv in plan.items() if title.startswith(prefix)]
    assert len(matches) == 1, f"expected one step starting with {prefix!r} in {list(plan)}"
    return matches[0]


def ssh_script(argv):
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1
    return commands[0][len("--command=") :]


# ------------------------------------------------------------------------------- TPU VM


TPU_ARGS = ["--tpu-name=llava-v4", "--zone=us-central2-b", "--accelerator-type=v4-32"]


def test_tpu_dry_run_prints_every_command():
    result = run(
        TPU_VM, *TPU_ARGS, "--project=my-proj", "--spot", "--delete-after",
        "--archive=/tmp/src.tar.gz", "--env=WANDB_MODE=offline", "--dry-run", "--", *TRAIN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = parse_plan(result.stdout)
    gcloud_tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    scope = ["--zone=us-central2-b", "--project=my-proj"]

    assert step(plan, "Reuse") == [*gcloud_tpu, "describe", "llava-v4", *scope, "--format=value(state)"]
    assert step(plan, "Otherwise create") == [
        *gcloud_tpu, "create", "llava-v4", *scope, "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base", "--spot",
    ]  # fmt: skip
    assert step(plan, "Package") == [
        "git", "-C", REPO_ROOT, "archive", "--format=tar.gz", "--output=/tmp/src.tar.gz", "HEAD",
    ]  # fmt: skip
    assert step(plan, "Copy") == [
        *gcloud_tpu, "scp", "/tmp/src.tar.gz", "llava-v4:llava_jax_src.tar.gz", *scope, "--worker=all",
    ]  # fmt: skip

    install = step(plan, "Install")
    assert install[:6] == [*gcloud_tpu, "ssh", "llava-v4"] and "--worker=all" in install
    install_lines = ssh_script(install).splitlines()
    assert install_lines[0] == "set -euo pipefail"
    assert "tar -xzf llava_jax_src.tar.gz -C llava_jax" in install_lines
    assert 'llava_venv/bin/pip install -q -U "jax[tpu]"' in install_lines
    assert install_lines[-1] == "llava_venv/bin/pip install -q -e ./llava_jax"

    train = step(plan, "Train")
    assert train[:6] == [*gcloud_tpu, "ssh", "llava-v4"] and "--worker=all" in train
    train_lines = ssh_script(train).splitlines()
    assert "export WANDB_MODE=offline" in train_lines
    # The training command reaches the workers verbatim, quoting included.
    command, pipe = train_lines[-1].rsplit(" 2>&1 | ", 1)
    assert shlex.split(command) == TRAIN
    assert pipe == "tee ../llava_jax_train.log"

    assert step(plan, "Delete") == [*gcloud_tpu, "delete", "llava-v4", *scope, "--quiet"]
    assert list(plan)[-1].startswith("Delete")


def test_tpu_dry_run_variants():
    result = run(
        TPU_VM, "--tpu-name=t", "--zone=europe-west4-a", "--accelerator-type=v6e-8",
        "--repo-url=https://example.com/llava_jax.git", "--ref=v0.1", "--dry-run", "--", "python", "-V",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = parse_plan(result.stdout)
    assert "--version=v2-alpha-tpuv6e" in step(plan, "Otherwise create")
    assert "--spot" not in step(plan, "Otherwise create")
    # With --repo-url nothing is packaged or copied; the workers clone.
    assert not any(title.startswith(("Package", "Copy", "Delete")) for title in plan)
    install_lines = ssh_script(step(plan, "Install")).splitlines()
    assert "git clone https://example.com/llava_jax.git llava_jax" in install_lines
    assert "git -C llava_jax checkout v0.1" in install_lines
    assert all(a != "--project" and not a.startswith("--project=") for a in step(plan, "Reuse"))


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v3-8", "tpu-ubuntu2204-base")],
)
def test_tpu_runtime_version_follows_generation(accelerator, runtime):
    result = run(TPU_VM, "--tpu-name=t", "--zone=z", f"--accelerator-type={accelerator}",
                 "--dry-run", "--", "true")  # fmt: skip
    assert f"--version={runtime}" in step(parse_plan(result.stdout), "Otherwise create")
    explicit = run(TPU_VM, "--tpu-name=t", "--zone=z", f"--accelerator-type={accelerator}",
                   "--runtime-version=custom-image", "--dry-run", "--", "true")  # fmt: skip
    assert "--version=custom-image" in step(parse_plan(explicit.stdout), "Otherwise create")


def test_tpu_skip_install_only_probes_and_trains():
    result = run(TPU_VM, *TPU_ARGS, "--skip-install", "--dry-run", "--", *TRAIN)
    titles = list(parse_plan(result.stdout))
    assert [t.split()[0] for t in titles] == ["Reuse", "Otherwise", "Train"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone=z", "--accelerator-type=v4-8", "--", "true"], "--tpu-name"),
        (["--tpu-name=t", "--accelerator-type=v4-8", "--", "true"], "--zone"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4_8", "--", "true"], "Unknown accelerator type 'v4_8'"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=tpu-v4-8", "--", "true"], "Unknown accelerator type"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v5e-8", "--", "true"], "called v5litepod-N"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4-0", "--", "true"], "Unknown accelerator type"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4-8"], "training command after `--`"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4-8", "--env=1X=2", "--", "true"], "KEY=VALUE"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4-8", "--env=NOVALUE", "--", "true"], "KEY=VALUE"),
        (["--tpu-name=t", "--zone=z", "--accelerator-type=v4-8", "--jax-requirement=jax; rm -rf /",
          "--", "true"], "not a plain pip requirement"),
    ],
)  # fmt: skip
def test_tpu_bad_input_is_a_clear_error(args, message):
    result = run(TPU_VM, *args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_tpu_warns_about_local_workdir_on_multi_host_slice():
    local = run(TPU_VM, "--tpu-name=t", "--zone=z", "--accelerator-type=v4-64", "--dry-run",
                "--", "python", "-m", "llava_jax.train", "--workdir=/tmp/run")  # fmt: skip
    assert local.returncode == 0 and "gs:// bucket" in local.stderr
    single_host = run(TPU_VM, "--tpu-name=t", "--zone=z", "--accelerator-type=v4-8", "--dry-run",
                      "--", "python", "-m", "llava_jax.train", "--workdir=/tmp/run")  # fmt: skip
    assert single_host.stderr == ""


FAKE_GCLOUD = """#!/bin/bash
# Stand-in for `gcloud compute tpus tpu-vm VERB ...`: logs VERB, answers `describe` with
# $FAKE_TPU_STATE (no TPU VM when empty) and ends the training ssh with $FAKE_TRAIN_RC.
[[ $1 == compute && $2 == tpus && $3 == tpu-vm ]] || exit 99
echo "$4" >> "$GCLOUD_LOG"
if [[ $4 == describe ]]; then
  [[ -n $FAKE_TPU_STATE ]] || exit 1
  echo "$FAKE_TPU_STATE"
  exit 0
fi
if [[ $4 == ssh && $* == *"tee ../llava_jax_train.log"* ]]; then exit "${FAKE_TRAIN_RC:-0}"; fi
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log))

    def calls():
        return log.read_text().split() if log.exists() else []

    return env, calls


def test_tpu_run_creates_missing_vm_and_deletes_after_failed_training(fake_gcloud, tmp_path):
    env, calls = fake_gcloud
    archive = tmp_path / "src.tar.gz"
    env.update(FAKE_TPU_STATE="", FAKE_TRAIN_RC="3")
    result = run(TPU_VM, *TPU_ARGS, "--delete-after", f"--archive={archive}", "--", *TRAIN, env=env)
    assert result.returncode == 3  # the training step's exit code
    assert calls() == ["describe", "create", "scp", "ssh", "ssh", "delete"]
    assert archive.stat().st_size > 0  # git archive of HEAD really ran


def test_tpu_run_reuses_ready_vm_and_refuses_other_states(fake_gcloud):
    env, calls = fake_gcloud
    env["FAKE_TPU_STATE"] = "READY"
    result = run(TPU_VM, *TPU_ARGS, "--skip-install", "--", *TRAIN, env=env)
    assert result.returncode == 0, result.stderr
    assert calls() == ["describe", "ssh"]

    env["FAKE_TPU_STATE"] = "CREATING"
    result = run(TPU_VM, *TPU_ARGS, "--skip-install", "--", *TRAIN, env=env)
    assert result.returncode == 1
    assert "CREATING, not READY" in result.stderr
    assert calls() == ["describe", "ssh", "describe"]  # nothing run on a VM that is not READY


# ------------------------------------------------------------------------------- SLURM


def sbatch_dry_run(*args):
    result = run(SLURM_GPU, *args, "--dry-run", "--", *TRAIN)
    assert result.returncode == 0, result.stderr
    script = result.stdout.split("# submit:\n")[0].split("\n", 1)[1]
    submit = shlex.split(result.stdout.split("# submit:\n")[1])
    return script, submit


def test_slurm_dry_run_script():
    script, submit = sbatch_dry_run(
        "--nodes=2", "--partition=gpu", "--account=proj", "--time=24:00:00", "--cpus-per-task=32",
        "--chdir=/shared/llava_jax", "--setup=module load cuda/12.4",
        "--setup=source .venv/bin/activate", "--env=NCCL_DEBUG=WARN", "--env=XLA_FLAGS=--a --b",
    )  # fmt: skip
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=llava-jax", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--chdir=/shared/llava_jax", "--output=logs/%x-%j.out", "--partition=gpu",
        "--account=proj", "--time=24:00:00", "--cpus-per-task=32",
    ]  # fmt: skip
    # Setup lines run before `set -u` (module scripts read unset variables).
    assert lines.index("module load cuda/12.4") < lines.index("set -u")
    assert lines.index("source .venv/bin/activate") < lines.index("set -u")
    assert 'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))' in lines
    assert 'export JAX_COORDINATOR_ADDRESS="${nodes[0]}:$(( SLURM_JOB_ID % 4096 + 61440 ))"' in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert "export NCCL_DEBUG=WARN" in lines
    assert "export XLA_FLAGS='--a --b'" in lines
    assert shlex.split(lines[-1]) == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *TRAIN,
    ]  # fmt: skip
    assert submit == ["sbatch", "/shared/llava_jax/logs/llava-jax.sbatch"]
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_slurm_gres_and_fixed_port():
    script, _ = sbatch_dry_run("--nodes=1", "--gpus-per-node=4", "--gres", "--coordinator-port=29500")
    assert "#SBATCH --gres=gpu:4" in script
    assert "--gpus-per-node" not in script
    assert 'export JAX_COORDINATOR_ADDRESS="${nodes[0]}:29500"' in script
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes=0"], "--nodes must be at least 1; got 0"),
        (["--nodes=-2"], "--nodes must be at least 1; got -2"),
        (["--nodes=two"], "invalid int value"),
        (["--gpus-per-node=4"], "--nodes"),
        (["--nodes=1", "--gpus-per-node=0"], "--gpus-per-node must be at least 1"),
        (["--nodes=1", "--time=tomorrow"], "is not a SLURM time"),
        (["--nodes=1", "--coordinator-port=80"], "1024..65535"),
        (["--nodes=1", "--job-name=a b"], "--job-name"),
        (["--nodes=1", "--env=A"], "KEY=VALUE"),
    ],
)
def test_slurm_bad_input_is_a_clear_error(args, message):
    result = run(SLURM_GPU, *args, "--dry-run", "--", *TRAIN)
    assert result.returncode == 2
    assert message in result.stderr


def test_slurm_needs_training_command():
    result = run(SLURM_GPU, "--nodes=1", "--dry-run")
    assert result.returncode == 2 and "training command after `--`" in result.stderr


def test_slurm_submit_writes_script_and_calls_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "sbatch", '#!/bin/bash\necho "$@" > "$SBATCH_LOG"\necho "Submitted batch job 42"\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SBATCH_LOG=str(tmp_path / "sbatch.log"))  # fmt: skip
    workdir = tmp_path / "project"
    args = ["--nodes=2", f"--chdir={workdir}", "--", *TRAIN]
    result = run(SLURM_GPU, *args, env=env)
    assert result.returncode == 0, result.stderr
    sbatch_file = workdir / "logs" / "llava-jax.sbatch"
    assert (tmp_path / "sbatch.log").read_text().split() == [str(sbatch_file)]
    dry = run(SLURM_GPU, *args[:-len(TRAIN) - 1], "--dry-run", "--", *TRAIN)
    assert sbatch_file.read_text() == dry.stdout.split("# submit:\n")[0].split("\n", 1)[1]
    assert (workdir / "logs").is_dir()  # SLURM needs the --output directory to exist


FAKE_SCONTROL = """#!/bin/bash
# `scontrol show hostnames a,b` -> one host per line (no bracket ranges needed here).
[[ $1 == show && $2 == hostnames ]] || exit 1
tr ',' '\\n' <<< "$3"
"""
FAKE_SRUN = """#!/bin/bash
# Starts --nodes=N local copies of the command with the variables srun sets per task.
n=1
while [[ $1 == --* ]]; do case $1 in --nodes=*) n=${1#--nodes=};; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_slurm_script_sets_up_jax_distributed(tmp_path):
    """Run the generated script with two local JAX processes standing in for two nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    write_executable(bin_dir / "srun", FAKE_SRUN)
    # Each process reports into its own file: two processes printing to one pipe can interleave
    # within a line (every print() piece is a separate write when PYTHONUNBUFFERED is set).
    probe = (
        "import jax, pathlib; jax.distributed.initialize(); i = jax.process_index(); "
        "pathlib.Path(f'report-{i}.txt').write_text("
        "f'process {i} {jax.process_count()} {jax.config.read(\"jax_cuda_visible_devices\")}')"
    )
    result = run(SLURM_GPU, "--nodes=2", "--gpus-per-node=2", f"--coordinator-port={_free_port()}",
                 f"--chdir={tmp_path}", "--dry-run", "--", sys.executable, "-c", probe)  # fmt: skip
    script = result.stdout.split("# submit:\n")[0].split("\n", 1)[1]
    env = dict(
        os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", JAX_PLATFORMS="cpu",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost,localhost", SLURM_JOB_NUM_NODES="2",
    )  # fmt: skip
    job = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    reports = sorted(path.read_text() for path in tmp_path.glob("report-*.txt"))
    # Both processes joined one job of 2, and each keeps both of its node's GPUs (JAX's SLURM
    # detection alone would have narrowed each to GPU SLURM_LOCALID = 0).
    assert reports == ["process 0 2 0,1", "process 1 2 0,1"]
    assert "coordinator localhost:" in job.stdout


# ------------------------------------------------------------------------------- both


@pytest.mark.parametrize(
    "script, args",
    [(TPU_VM, TPU_ARGS), (SLURM_GPU, ["--nodes=2", "--chdir=/shared/llava_jax"])],
)
def test_launchers_also_run_as_modules_of_the_repo(script, args):
    """`python -m launch.NAME` (shared code imported as launch.common) plans what the script does."""
    as_script = run(script, *args, "--dry-run", "--", *TRAIN)
    name = os.path.splitext(os.path.basename(script))[0]
    as_module = subprocess.run(
        [sys.executable, "-m", f"launch.{name}", *args, "--dry-run", "--", *TRAIN],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert as_script.returncode == as_module.returncode == 0, as_module.stderr
    assert as_module.stdout == as_script.stdout
