"""What the launchers (tpu_vm.py, slurm_gpu.py, local.py) share: the `--` split, `--env`, checks.

Standard library only, like the launchers. They import it as `common` when run as scripts
(`python launch/tpu_vm.py`: launch/ is sys.path[0]) and as `launch.common` when imported as
part of the repository (`python -m launch.tpu_vm`, tests).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def split_train_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher flags before the first `--`, the training command (verbatim) after it."""
    if "--" not in argv:
        return argv, []
    index = argv.index("--")
    return argv[:index], argv[index + 1 :]


def parse_with_train_command(
    parser: argparse.ArgumentParser, argv: list[str], example_workdir: str
) -> tuple[argparse.Namespace, list[str]]:
    """Parse the launcher flags; exit 2 (argparse error) when no training command follows `--`."""
    launcher_argv, train_command = split_train_command(argv)
    args = parser.parse_args(launcher_argv)
    if not train_command:
        parser.error(
            "give the training command after `--`, e.g. -- python -m llava_jax.train "
            f"--config=configs/finetune.py:7b --workdir={example_workdir}"
        )
    return args, train_command


def check_env(parser: argparse.ArgumentParser, items: list[str]) -> None:
    """Every `--env` item must be KEY=VALUE with KEY a shell variable name (argparse error)."""
    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or not ENV_NAME_PATTERN.match(name):
            parser.error(f"--env expects KEY=VALUE with a shell variable name; got {item!r}")


def env_exports(items: list[str]) -> list[str]:
    """`export KEY=VALUE` shell lines for the `--env` items, the values shell-quoted."""
    return [f"export {name}={shlex.quote(value)}"
            for name, _, value in (item.partition("=") for item in items)]  # fmt: skip


def env_dict(items: list[str]) -> dict[str, str]:
    """The `--env` items (already checked by `check_env`) as a dict; a later KEY wins."""
    return dict(item.partition("=")[::2] for item in items)


def check_at_least(parser: argparse.ArgumentParser, flag: str, value: int, minimum: int) -> None:
    """argparse error unless `value` >= `minimum`, naming the flag."""
    if value < minimum:
        parser.error(f"{flag} must be at least {minimum}; got {value}")


def check_port(parser: argparse.ArgumentParser, flag: str, port: int) -> None:
    """argparse error unless `port` is an unprivileged TCP port (1024..65535)."""
    if not 1024 <= port <= 65535:
        parser.error(f"{flag} must be in 1024..65535; got {port}")
