#!/usr/bin/env python3
"""Run a multi-process JAX job on this machine: N processes on CPU, M devices each.

    python launch/local.py --num-processes=2 --devices-per-process=4 \\
        -- python -m llava_jax.train --config=configs/demo.py --workdir=/tmp/run1 \\
           --config.distributed=yes

The same code path as a pod slice or a SLURM job, without the hardware: `jax.distributed` with
a coordinator on 127.0.0.1, per-process data shards, global arrays built from process-local
batches, one checkpoint written jointly by all processes, resume. Each process gets:

  * JAX_COORDINATOR_ADDRESS=127.0.0.1:<port> (a free port, or --coordinator-port), which JAX
    reads itself;
  * LLAVA_JAX_NUM_PROCESSES=N and LLAVA_JAX_PROCESS_ID=i, which JAX does not read:
    `llava_jax.sharding.maybe_initialize_distributed` (train.py, eval.py) passes them to
    `jax.distributed.initialize`;
  * JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=M (added to the
    XLA_FLAGS you already have) and JAX_NUM_CPU_DEVICES=M;
  * PYTHONUNBUFFERED=1, so lines arrive as they are printed.

Output: every line of process i (stdout and stderr together) is printed with a `[p<i>] `
prefix; `--log-dir DIR` also keeps each process's output, unprefixed, in DIR/p<i>.log.

Failures: when a process exits non-zero (or is killed), the launcher names it and its exit
code, sends SIGTERM to the others, SIGKILL after --kill-timeout seconds, and exits with that
process's code (128 + N for signal N). It does not wait for JAX's own heartbeat timeouts.
SIGINT/SIGTERM sent to the launcher are forwarded, as they are, to every process (on SIGTERM
training saves a checkpoint and exits 143); a second one kills them all.

Standard library only, like the other launchers.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

if __package__:  # imported as launch.local (python -m launch.local, tests)
    from . import common
else:  # run as a script: launch/ is sys.path[0]
    import common

# Read by llava_jax.sharding.maybe_initialize_distributed (same names there; JAX itself reads
# only JAX_COORDINATOR_ADDRESS).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "LLAVA_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "LLAVA_JAX_PROCESS_ID"
RESERVED_ENV = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, "JAX_NUM_CPU_DEVICES")
DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count(=\S*)?")
LOOPBACK = "127.0.0.1"
POLL_SECONDS = 0.1
PREFIX = "launch/local.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/local.py",
        description="Run the command given after `--` as N JAX processes on this machine "
        "(CPU devices, coordinator on 127.0.0.1), the way a pod slice or SLURM job runs it.",
        usage="%(prog)s --num-processes N [--devices-per-process M] [options] -- COMMAND",
    )
    parser.add_argument("--num-processes", type=int, required=True,
                        help="Number of JAX processes (>= 1).")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="CPU devices of each process (default 1).")
    parser.add_argument("--coordinator-port", type=int,
                        help="Coordinator port on 127.0.0.1 (default: a free port).")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="Environment variable for every process (repeatable).")
    parser.add_argument("--log-dir",
                        help="Also write each process's output (unprefixed) to DIR/p<i>.log.")
    parser.add_argument("--kill-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="After a process fails: seconds the others get to exit after "
                        "SIGTERM before SIGKILL (default 10).")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print each process's environment and command instead of running.")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse and validate; argparse errors (exit code 2) carry a message saying what to fix."""
    parser = build_parser()
    args, command = common.parse_with_train_command(parser, argv, "/tmp/llava_run")
    common.check_at_least(parser, "--num-processes", args.num_processes, 1)
    common.check_at_least(parser, "--devices-per-process", args.devices_per_process, 1)
    if args.coordinator_port is not None:
        common.check_port(parser, "--coordinator-port", args.coordinator_port)
    if not args.kill_timeout > 0:
        parser.error(f"--kill-timeout must be a positive number of seconds; "
                     f"got {args.kill_timeout}")
    common.check_env(parser, args.env)
    for name in common.env_dict(args.env):
        if name in RESERVED_ENV:
            parser.error(f"--env {name}=...: the launcher sets {name} itself "
                         "(use --num-processes / --devices-per-process / --coordinator-port)")
    if not args.dry_run and shutil.which(command[0]) is None:
        parser.error(f"the command {command[0]!r} is not an executable or on PATH")
    return args, command


def free_port() -> int:
    """A port nothing listens on now (the OS's pick; released before the processes start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def process_env(args: argparse.Namespace, port: int, index: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the launcher sets for process `index` (added to `base`, default ours)."""
    env = dict(os.environ if base is None else base)
    env.update(common.env_dict(args.env))
    xla_flags = DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    xla_flags.append(f"--xla_force_host_platform_device_count={args.devices_per_process}")
    env.update({
        COORDINATOR_ENV: f"{LOOPBACK}:{port}",
        NUM_PROCESSES_ENV: str(args.num_processes),
        PROCESS_ID_ENV: str(index),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(xla_flags),
        "JAX_NUM_CPU_DEVICES": str(args.devices_per_process),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def dry_run_env(args: argparse.Namespace, port: int, index: int) -> dict[str, str]:
    """What process `index` gets beyond the launcher's own environment: --env, then ours."""
    env = process_env(args, port, index)
    keys = [*common.env_dict(args.env), COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV,
            "JAX_PLATFORMS", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "PYTHONUNBUFFERED"]
    return {key: env[key] for key in dict.fromkeys(keys)}


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """A child's return code as a shell would report it (128 + N for signal N)."""
    return 128 - code if code < 0 else code


def root_cause(failed: list[tuple[int, int]]) -> tuple[int, int]:
    """The failure to blame among (index, exit code) pairs first seen dead in the same poll.

    A process killed by a signal (negative code: OOM killer, kill -9, a crash) is the cause;
    the others' error exits are usually its consequence (a collective whose peer vanished
    fails within milliseconds, often before the next poll). Otherwise the lowest index.
    """
    return min(failed, key=lambda item: (item[1] >= 0, item[0]))


def say(message: str) -> None:
    print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)


class Job:
    """The running processes, their output pumps and the shutdown logic."""

    def __init__(self, args: argparse.Namespace, command: list[str], port: int):
        self.args, self.command, self.port = args, command, port
        self.processes: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.write_lock = threading.Lock()
        self.signals_received = 0

    # ----- output -----
    def _pump(self, index: int, stream, log_file) -> None:
        prefix = f"[p{index}] ".encode()
        out = sys.stdout.buffer
        for line in iter(stream.readline, b""):
            if log_file is not None:
                log_file.write(line)
                log_file.flush()
            if not line.endswith(b"\n"):
                line += b"\n"
            with self.write_lock:
                out.write(prefix + line)
                out.flush()
        stream.close()
        if log_file is not None:
            log_file.close()

    # ----- processes -----
    def start(self) -> None:
        if self.args.log_dir:
            os.makedirs(self.args.log_dir, exist_ok=True)
        for index in range(self.args.num_processes):
            env = process_env(self.args, self.port, index)
            # Own session: a Ctrl-C in the terminal reaches the launcher only, which forwards it
            # (once) to every process group, including any workers a process started.
            process = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            self.processes.append(process)
            log_file = (open(os.path.join(self.args.log_dir, f"p{index}.log"), "wb")
                        if self.args.log_dir else None)
            pump = threading.Thread(target=self._pump, args=(index, process.stdout, log_file),
                                    daemon=True)
            pump.start()
            self.pumps.append(pump)
        pids = ", ".join(f"p{i}={p.pid}" for i, p in enumerate(self.processes))
        say(f"{self.args.num_processes} processes x {self.args.devices_per_process} CPU devices, "
            f"coordinator {LOOPBACK}:{self.port}; pids {pids}")

    def running(self) -> list[int]:
        return [i for i, p in enumerate(self.processes) if p.poll() is None]

    def signal_all(self, sig: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, sig)  # the process and anything it started
                except (ProcessLookupError, PermissionError):
                    pass

    def on_signal(self, signum, _frame) -> None:
        self.signals_received += 1
        name = signal.Signals(signum).name
        if self.signals_received == 1:
            say(f"{name}: forwarding it to all processes (send it again to kill them)")
            self.signal_all(signum)
        else:
            say(f"{name} again: killing all processes")
            self.signal_all(signal.SIGKILL)

    def wait_until_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def run(self) -> int:
        """Wait for all processes; stop the rest when one fails. The launcher's exit status."""
        first_failure, stopped_others = None, False
        while self.running():
            # After a signal from the user the processes are stopping (saving) on their own;
            # only a second signal kills them.
            if first_failure is None and not self.signals_received:
                failed = [(index, code) for index, process in enumerate(self.processes)
                          if (code := process.poll()) not in (None, 0)]
                if failed:
                    first_failure = root_cause(failed)
                if first_failure is not None and self.running():
                    stopped_others = True
                    index, code = first_failure
                    others = ", ".join(f"p{i}" for i in self.running())
                    say(f"process {index} (pid {self.processes[index].pid}) {describe_exit(code)}"
                        f"; stopping the others ({others}): SIGTERM, SIGKILL after "
                        f"{self.args.kill_timeout:g} s")
                    self.signal_all(signal.SIGTERM)
                    if not self.wait_until_gone(self.args.kill_timeout):
                        say(f"still running after {self.args.kill_timeout:g} s: "
                            + ", ".join(f"p{i}" for i in self.running()) + "; SIGKILL")
                        self.signal_all(signal.SIGKILL)
                    continue
            time.sleep(POLL_SECONDS)
        for process in self.processes:  # reap (running() polled them all already)
            process.wait()
        for pump in self.pumps:  # the rest of the output; a pipe a grandchild kept open is left
            pump.join(timeout=5)
        codes = [p.returncode for p in self.processes]
        if first_failure is None:
            failed = [(i, c) for i, c in enumerate(codes) if c != 0]
            first_failure = root_cause(failed) if failed else None
        if first_failure is None:
            say(f"all {len(codes)} processes exited with code 0")
            return 0
        index, code = first_failure
        summary = ", ".join(f"p{i}: {c}" for i, c in enumerate(codes))
        if self.signals_received:
            say(f"stopped on request (exit codes {summary})")
        else:
            if not stopped_others:  # all were gone by the time the failure was seen
                say(f"process {index} (pid {self.processes[index].pid}) {describe_exit(code)}")
            say(f"FAILED: process {index} {describe_exit(code)} (exit codes {summary})")
        return exit_status(code)


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.coordinator_port or free_port()
    if args.dry_run:
        print(f"# {args.num_processes} processes on this machine, coordinator {LOOPBACK}:{port}")
        for index in range(args.num_processes):
            env = dry_run_env(args, port, index)
            print(f"# process {index}")
            print(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *command]))
        return 0
    job = Job(args, command, port)
    previous = {sig: signal.signal(sig, job.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        job.start()
        return job.run()
    finally:
        job.signal_all(signal.SIGKILL)  # nothing outlives the launcher (an exception above)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
