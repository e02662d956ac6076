#!/usr/bin/env python3
"""Train llava_jax on several GPU nodes under SLURM: write an sbatch script and submit it.

    python launch/slurm_gpu.py --nodes=2 --gpus-per-node=8 --partition=gpu --time=24:00:00 \\
        -- python -m llava_jax.train --config=configs/finetune.py:7b --workdir=/shared/run1

The job runs ONE process per node that drives all of the node's GPUs (JAX's usual layout:
fewer processes, and each process's arrays span its local devices). `srun` starts the
processes; in each, `jax.distributed.initialize()` called with no arguments finds:

  * coordinator address: from JAX_COORDINATOR_ADDRESS, which the script sets to the first
    host of `scontrol show hostnames $SLURM_JOB_NODELIST` and a port derived from the job id;
  * number of processes: SLURM_NTASKS (= nodes, set by srun), via JAX's SLURM detection;
  * process id: SLURM_PROCID (set by srun), via JAX's SLURM detection;
  * local devices: JAX_LOCAL_DEVICE_IDS=0,...,G-1, set by the script. Without it, JAX's SLURM
    detection assumes one process per GPU and gives each process only GPU SLURM_LOCALID,
    i.e. one GPU per node here.

`--dry-run` prints the sbatch script and the `sbatch` command instead of writing/submitting.
Standard library only, so it runs on a login node without JAX.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

if __package__:  # imported as launch.slurm_gpu (python -m launch.slurm_gpu, tests)
    from . import common
else:  # run as a script: launch/ is sys.path[0]
    import common

# SLURM --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_PATTERN = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
# Same port rule as JAX's own SLURM detection: an ephemeral port picked by the job id, so two
# jobs sharing a node do not collide.
PORT_FROM_JOB_ID = "$(( SLURM_JOB_ID % 4096 + 61440 ))"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/slurm_gpu.py",
        description="Write and submit an sbatch script that runs the training command given "
        "after `--` once per node, each process using all of the node's GPUs.",
        usage="%(prog)s --nodes N [options] -- TRAINING COMMAND",
    )
    parser.add_argument("--nodes", type=int, required=True, help="Number of nodes (>= 1).")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8).")
    parser.add_argument("--job-name", default="llava-jax", help="SLURM job name.")
    parser.add_argument("--partition", help="SLURM partition.")
    parser.add_argument("--account", help="SLURM account.")
    parser.add_argument("--qos", help="SLURM QOS.")
    parser.add_argument("--time", help="Wall-clock limit, e.g. 24:00:00 or 2-00:00:00.")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores for each node's process.")
    parser.add_argument("--mem", help="Memory per node, e.g. 0 (all) or 500G.")
    parser.add_argument(
        "--gres",
        action="store_true",
        help="Request GPUs as --gres=gpu:G instead of --gpus-per-node=G (older clusters).",
    )
    parser.add_argument(
        "--output",
        default="logs/%x-%j.out",
        help="SLURM output file, relative to --chdir (default logs/%%x-%%j.out).",
    )
    parser.add_argument(
        "--chdir",
        default=common.REPO_ROOT,
        help="Directory the job runs in: the project on a shared filesystem "
        "(default: this checkout).",
    )
    parser.add_argument(
        "--coordinator-port",
        type=int,
        help="Coordinator port on the first node (default: 61440 + job id %% 4096).",
    )
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="Shell line run before training on the batch host, e.g. 'module load cuda/12.4' "
        "or 'source .venv/bin/activate' (repeatable; srun tasks inherit the environment).",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Environment variable exported for the training processes (repeatable).",
    )
    parser.add_argument(
        "--sbatch-file",
        help="Where to write the script (default: <chdir>/logs/<job-name>.sbatch).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the sbatch script and the sbatch command instead of writing/submitting.",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse and validate; argparse errors (exit code 2) carry a message saying what to fix."""
    parser = build_parser()
    args, train_command = common.parse_with_train_command(parser, argv, "/shared/runs/run1")
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1; got {args.nodes}")
    if args.gpus_per_node < 1:
        parser.error(f"--gpus-per-node must be at least 1; got {args.gpus_per_node}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        parser.error(f"--cpus-per-task must be at least 1; got {args.cpus_per_task}")
    if args.time is not None and not TIME_PATTERN.match(args.time):
        parser.error(f"--time {args.time!r} is not a SLURM time such as 24:00:00 or 2-00:00:00")
    if args.coordinator_port is not None and not 1024 <= args.coordinator_port <= 65535:
        parser.error(f"--coordinator-port must be in 1024..65535; got {args.coordinator_port}")
    if not re.match(r"^[A-Za-z0-9_.-]+$", args.job_name):
        parser.error(f"--job-name {args.job_name!r}: use letters, digits, '.', '_' or '-'")
    common.check_env(parser, args.env)
    args.chdir = os.path.abspath(args.chdir)
    if args.sbatch_file is None:
        args.sbatch_file = os.path.join(args.chdir, "logs", f"{args.job_name}.sbatch")
    return args, train_command


def render_sbatch(args: argparse.Namespace, train_command: list[str]) -> str:
    """The sbatch script text."""
    gpu_request = f"gpu:{args.gpus_per_node}"
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        # One task (= one JAX process) per node; it sees all the node's GPUs.
        "--ntasks-per-node=1",
        f"--gres={gpu_request}" if args.gres else f"--gpus-per-node={args.gpus_per_node}",
        f"--chdir={args.chdir}",
        f"--output={args.output}",
    ]
    for flag, value in (
        ("partition", args.partition),
        ("account", args.account),
        ("qos", args.qos),
        ("time", args.time),
        ("cpus-per-task", args.cpus_per_task),
        ("mem", args.mem),
    ):
        if value is not None:
            directives.append(f"--{flag}={value}")

    port = str(args.coordinator_port) if args.coordinator_port else PORT_FROM_JOB_ID
    local_devices = ",".join(str(i) for i in range(args.gpus_per_node))
    srun = [
        "srun", f"--nodes={args.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        *train_command,
    ]  # fmt: skip

    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {directive}" for directive in directives),
        "# Generated by launch/slurm_gpu.py.",
        "set -eo pipefail",
        *args.setup,
        # -u only after the setup lines: `module load` and some activate scripts read unset
        # variables.
        "set -u",
        "",
        "# Process 0 runs on the first node of the allocation and hosts the JAX coordinator.",
        'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        f'export JAX_COORDINATOR_ADDRESS="${{nodes[0]}}:{port}"',
        "# One process per node drives all its GPUs (JAX's SLURM detection would give it one).",
        f"export JAX_LOCAL_DEVICE_IDS={local_devices}",
        *common.env_exports(args.env),
        "# srun sets SLURM_NTASKS (process count) and SLURM_PROCID (process id) in each task;",
        "# jax.distributed.initialize() reads them.",
        'echo "coordinator ${JAX_COORDINATOR_ADDRESS}, ${SLURM_JOB_NUM_NODES} nodes: ${nodes[*]}"',
        shlex.join(srun),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, train_command = parse_args(sys.argv[1:] if argv is None else argv)
    script = render_sbatch(args, train_command)
    submit = ["sbatch", args.sbatch_file]
    if args.dry_run:
        print(f"# sbatch script ({args.sbatch_file}):")
        print(script, end="")
        print("# submit:")
        print(shlex.join(submit))
        return 0
    # SLURM does not create the --output directory; a missing one makes the job fail silently.
    os.makedirs(os.path.join(args.chdir, os.path.dirname(args.output)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.sbatch_file)), exist_ok=True)
    with open(args.sbatch_file, "w", encoding="utf-8") as handle:
        handle.write(script)
    print(f"wrote {args.sbatch_file}", file=sys.stderr)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main())
