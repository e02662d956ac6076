#!/usr/bin/env python3
"""Train llava_jax on a Cloud TPU VM or pod slice, driving `gcloud` from your machine.

    python launch/tpu_vm.py --tpu-name=llava-v4 --zone=us-central2-b --accelerator-type=v4-32 \\
        -- python -m llava_jax.train --config=configs/finetune.py:7b --workdir=gs://BUCKET/run1

Steps (each one a gcloud/git command; `--dry-run` prints them instead of running them):
  1. `tpu-vm describe`: reuse the TPU VM if it exists (it must be READY), else
  2. `tpu-vm create` it with the accelerator type and a matching TPU software version.
  3. Ship the code: `git archive HEAD` of this checkout + `tpu-vm scp --worker=all`, or
     `git clone --repo-url` on every worker.
  4. Install on every worker (`tpu-vm ssh --worker=all`): a venv with `jax[tpu]` and
     `pip install -e` of the project.
  5. Run the training command, unchanged, on every worker at once. The output of all workers
     streams to this terminal and is kept in ~/llava_jax_train.log on each worker.
  6. With `--delete-after`, delete the TPU VM, also when training failed.

On a pod slice every worker runs the same program; `jax.distributed.initialize()` with no
arguments finds the coordinator and the process ids from the TPU metadata, so nothing is
passed here. Checkpoints must go to a bucket (`--workdir=gs://...`) that all workers share.

No dependency beyond the standard library (and `gcloud`, `git` on the PATH), so the launcher
runs on a laptop without JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

if __package__:  # imported as launch.tpu_vm (python -m launch.tpu_vm, tests)
    from . import common
else:  # run as a script: launch/ is sys.path[0]
    import common

# gcloud's accelerator types: TPU generation, then the TensorCore count (v2-v4, v5p) or the
# chip count (v5litepod = v5e, v6e). Anything else is most likely a typo.
ACCELERATOR_PATTERN = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$")
# TPU software versions for JAX, per generation (Cloud TPU docs, "TPU software versions").
DEFAULT_RUNTIME_VERSION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
# Above 8 (cores or chips, depending on the generation) a slice spans several hosts.
SINGLE_HOST_MAX = 8

REMOTE_CODE_DIR = "llava_jax"  # relative to the home directory, where ssh sessions start
REMOTE_VENV = "llava_venv"
REMOTE_ARCHIVE = "llava_jax_src.tar.gz"
REMOTE_LOG = "llava_jax_train.log"
# A pip requirement such as jax[tpu]==0.7.2: no quotes, spaces or `$` to escape.
PIP_REQUIREMENT_PATTERN = re.compile(r"^[A-Za-z0-9_.\-\[\],<>=!~]+$")


@dataclasses.dataclass
class Step:
    """One command of the launch plan."""

    title: str
    argv: list[str]
    # "always"; "probe" (describe: decides whether the TPU VM exists); "if_missing" (create:
    # only when the probe found nothing); "cleanup" (runs even when an earlier step failed).
    when: str = "always"


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    """('v4', 32) from 'v4-32'; ValueError with the accepted forms otherwise."""
    match = ACCELERATOR_PATTERN.match(accelerator_type)
    if not match:
        hint = ""
        if accelerator_type.startswith("v5e"):
            hint = " (TPU v5e is called v5litepod-N in gcloud)"
        raise ValueError(
            f"Unknown accelerator type {accelerator_type!r}{hint}. Expected GENERATION-SIZE "
            f"with GENERATION one of {', '.join(DEFAULT_RUNTIME_VERSION)}, e.g. v4-8, v4-32, "
            "v5litepod-16, v5p-64, v6e-8."
        )
    return match.group(1), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/tpu_vm.py",
        description="Create or reuse a Cloud TPU VM / pod slice, install llava_jax on every "
        "worker and run the training command given after `--` on all of them.",
        usage="%(prog)s --tpu-name NAME --zone ZONE --accelerator-type TYPE [options] "
        "-- TRAINING COMMAND",
    )
    parser.add_argument("--tpu-name", required=True, help="TPU VM name (created if missing).")
    parser.add_argument("--zone", required=True, help="GCP zone, e.g. us-central2-b.")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured one).")
    parser.add_argument(
        "--accelerator-type", required=True, help="e.g. v4-8, v4-32, v5litepod-16, v6e-8."
    )
    parser.add_argument(
        "--runtime-version",
        help="TPU software version for `create` (default: the JAX image of the generation).",
    )
    parser.add_argument("--spot", action="store_true", help="Create a Spot TPU VM.")
    parser.add_argument(
        "--repo-url",
        help="git URL to clone on the workers instead of shipping this checkout's HEAD.",
    )
    parser.add_argument("--ref", default="main", help="Branch/tag/commit for --repo-url.")
    parser.add_argument(
        "--archive",
        help="Local path for the `git archive` of HEAD (default: a file in the temp dir).",
    )
    parser.add_argument(
        "--jax-requirement",
        default="jax[tpu]",
        help="pip requirement for JAX on the workers (pin it to match your local JAX).",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Environment variable for the training command (repeatable).",
    )
    parser.add_argument(
        "--skip-install", action="store_true", help="Reuse the code and venv already there."
    )
    parser.add_argument(
        "--delete-after",
        action="store_true",
        help="Delete the TPU VM when training ends, whether it succeeded or not.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the commands instead of running them."
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse and validate; argparse errors (exit code 2) carry a message saying what to fix."""
    parser = build_parser()
    args, train_command = common.parse_with_train_command(parser, argv, "gs://BUCKET/run")
    if not args.tpu_name.strip():
        parser.error("--tpu-name must not be empty")
    try:
        args.generation, args.size = parse_accelerator(args.accelerator_type)
    except ValueError as error:
        parser.error(str(error))
    if not PIP_REQUIREMENT_PATTERN.match(args.jax_requirement):
        parser.error(f"--jax-requirement {args.jax_requirement!r} is not a plain pip requirement")
    common.check_env(parser, args.env)
    if args.runtime_version is None:
        args.runtime_version = DEFAULT_RUNTIME_VERSION[args.generation]
    if args.archive is None:
        args.archive = os.path.join(tempfile.gettempdir(), f"llava_jax_{args.tpu_name}.tar.gz")
    return args, train_command


def _scope_flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _ssh_all(args: argparse.Namespace, script: str) -> list[str]:
    """`tpu-vm ssh --worker=all` running `script` on every worker at once.

    sshd hands the command to the user's login shell with `-c`; on the Ubuntu-based TPU VM
    images that is bash, which the scripts rely on (`set -o pipefail`, `source`).
    """
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu_name, *_scope_flags(args),
        "--worker=all", f"--command={script}",
    ]  # fmt: skip


def install_script(args: argparse.Namespace) -> str:
    """Shell script that puts the code and a venv with jax[tpu] + llava_jax on a worker."""
    if args.repo_url:
        fetch = [
            f"rm -rf {REMOTE_CODE_DIR}",
            f"git clone {shlex.quote(args.repo_url)} {REMOTE_CODE_DIR}",
            f"git -C {REMOTE_CODE_DIR} checkout {shlex.quote(args.ref)}",
        ]
    else:
        fetch = [
            f"rm -rf {REMOTE_CODE_DIR}",
            f"mkdir -p {REMOTE_CODE_DIR}",
            f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_CODE_DIR}",
        ]
    pip = f"{REMOTE_VENV}/bin/pip"
    lines = [
        "set -euo pipefail",
        *fetch,
        # Some TPU images lack python3-venv; install it only when venv creation fails.
        f"python3 -m venv {REMOTE_VENV} || {{ sudo apt-get update -q && "
        f"sudo apt-get install -y -q python3-venv && python3 -m venv {REMOTE_VENV}; }}",
        f"{pip} install -q -U pip",
        # Double quotes: the requirement is validated to hold no shell-active characters.
        f'{pip} install -q -U "{args.jax_requirement}"',
        f"{pip} install -q -e ./{REMOTE_CODE_DIR}",
    ]
    return "\n".join(lines)


def train_script(args: argparse.Namespace, train_command: list[str]) -> str:
    """Shell script that runs the training command on a worker, tee-ing its output."""
    lines = [
        "set -euo pipefail",
        f"source {REMOTE_VENV}/bin/activate",
        *common.env_exports(args.env),
        f"cd {REMOTE_CODE_DIR}",
        f"{shlex.join(train_command)} 2>&1 | tee ../{REMOTE_LOG}",
    ]
    return "\n".join(lines)


def build_plan(args: argparse.Namespace, train_command: list[str]) -> list[Step]:
    """Every command of the launch, in order."""
    scope = _scope_flags(args)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    create = [
        *tpu, "create", args.tpu_name, *scope,
        f"--accelerator-type={args.accelerator_type}", f"--version={args.runtime_version}",
    ]  # fmt: skip
    if args.spot:
        create.append("--spot")
    plan = [
        Step(
            "Reuse the TPU VM if it exists (its state must be READY)",
            [*tpu, "describe", args.tpu_name, *scope, "--format=value(state)"],
            when="probe",
        ),
        Step("Otherwise create it", create, when="if_missing"),
    ]
    if not args.skip_install:
        if not args.repo_url:
            plan.append(
                Step(
                    "Package this checkout (committed files at HEAD)",
                    ["git", "-C", common.REPO_ROOT, "archive", "--format=tar.gz",
                     f"--output={args.archive}", "HEAD"],
                )  # fmt: skip
            )
            plan.append(
                Step(
                    "Copy the package to every worker",
                    [*tpu, "scp", args.archive, f"{args.tpu_name}:{REMOTE_ARCHIVE}", *scope,
                     "--worker=all"],
                )  # fmt: skip
            )
        plan.append(
            Step(
                "Install jax[tpu] and llava_jax on every worker",
                _ssh_all(args, install_script(args)),
            )
        )
    plan.append(
        Step(
            f"Train on every worker (output streams here; also in ~/{REMOTE_LOG} on each worker)",
            _ssh_all(args, train_script(args, train_command)),
        )
    )
    if args.delete_after:
        plan.append(
            Step(
                "Delete the TPU VM (--delete-after; also after a failure)",
                [*tpu, "delete", args.tpu_name, *scope, "--quiet"],
                when="cleanup",
            )
        )
    return plan


def print_plan(plan: list[Step], out=sys.stdout) -> None:
    """The dry run: a comment line per step, then the command, shell-quoted."""
    for number, step in enumerate(plan, start=1):
        note = {"if_missing": " (only if describe fails)", "cleanup": ""}.get(step.when, "")
        print(f"# {number}. {step.title}{note}", file=out)
        print(shlex.join(step.argv), file=out)


def _warn(message: str) -> None:
    print(f"tpu_vm.py: warning: {message}", file=sys.stderr)


def check_workdir(args: argparse.Namespace, train_command: list[str]) -> None:
    """Warn when a multi-host slice would write checkpoints to per-worker local disks."""
    if args.size <= SINGLE_HOST_MAX:
        return
    for token in train_command:
        if token.startswith("--workdir=") and not token.split("=", 1)[1].startswith("gs://"):
            _warn(
                f"{args.accelerator_type} has several workers; {token} is on each worker's own "
                "disk. Use a gs:// bucket so that all workers share checkpoints."
            )


def run_plan(plan: list[Step]) -> int:
    """Run the steps; returns the exit code of the first failing step (0 when all pass)."""
    exit_code = 0
    tpu_exists = False
    for step in plan:
        if step.when == "cleanup":
            continue
        if step.when == "if_missing" and tpu_exists:
            continue
        print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
        if step.when == "probe":
            result = subprocess.run(step.argv, capture_output=True, text=True)
            state = result.stdout.strip()
            tpu_exists = result.returncode == 0 and bool(state)
            if tpu_exists and state != "READY":
                _warn(f"the TPU VM exists but is {state}, not READY; start or delete it first.")
                exit_code = 1
                break
            continue
        result = subprocess.run(step.argv)
        if result.returncode != 0:
            exit_code = result.returncode
            break
    for step in plan:
        if step.when == "cleanup":
            print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
            cleanup = subprocess.run(step.argv)
            exit_code = exit_code or cleanup.returncode
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args, train_command = parse_args(sys.argv[1:] if argv is None else argv)
    check_workdir(args, train_command)
    plan = build_plan(args, train_command)
    if args.dry_run:
        print_plan(plan)
        return 0
    if not args.repo_url and not args.skip_install:
        status = subprocess.run(
            ["git", "-C", common.REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True,
        )  # fmt: skip
        if status.stdout.strip():
            _warn("uncommitted changes are not shipped: only HEAD is archived. Commit first.")
    return run_plan(plan)


if __name__ == "__main__":
    sys.exit(main())
