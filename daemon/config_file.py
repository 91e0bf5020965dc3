"""The ``--config FILE`` every command reads, and the folder flags every command shares.

A config file (JSON, or YAML by extension) maps flag names to values: the same keys as the
flags (docs/flags.md). One file serves every command: each takes the keys it knows and leaves
the others to the commands that use them, so ``python -m daemon status --config daemon.yaml``
reads the daemon's ``status_dir`` from it and ignores its ``learning_rate``. Flags given on the
command line win over the file, and ``--config=FILE`` means ``--config FILE``.

The file's values reach a parser as ``--key value`` strings placed before the command line's,
so they are typed exactly as the same flag typed by hand (YAML reads ``1e-3`` as a string;
``--learning_rate`` makes it a float). Standard library only (PyYAML for a YAML file): the
daemon and ``status`` read it without importing torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from daemon.config import DaemonArguments
from daemon.config_ops import OpsArguments
from daemon.exceptions import ConfigError

CONFIG_HELP = "A JSON or YAML file of the same keys as the flags; flags given on the command line win."
# The folders every command takes (from the command line or the config file), with the daemon's defaults.
FOLDER_FLAGS = {f.name: f for f in fields(DaemonArguments) if f.name in ("inbox_dir", "status_dir", "output_dir")}
# Keys only the daemon process reads: a training run's parser leaves them to it.
DAEMON_KEYS = frozenset(f.name for f in (*fields(DaemonArguments), *fields(OpsArguments)))


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config FILE`` (or ``--config=FILE``) out of ``argv``.

    Returns:
        ``(FILE or None, the other arguments in their order)``; the last ``--config`` wins.

    Raises:
        ConfigError: ``--config`` without a file name.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", nargs="?", const="")
    namespace, rest = parser.parse_known_args(argv)
    if namespace.config == "":
        raise ConfigError("--config needs a file name")
    return namespace.config, rest


def read_config(path: str) -> dict[str, Any]:
    """The mapping of flag names to values in config file ``path`` (YAML for ``.yaml``/``.yml``, else JSON).

    Raises:
        ConfigError: the file is missing, unreadable, not JSON/YAML, or not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: not YAML: {' '.join(str(e).split())}") from e
        else:
            data = json.loads(text)
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not JSON
        raise ConfigError(f"--config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return data


def as_argv(values: dict[str, Any]) -> list[str]:
    """``values`` as command-line strings: ``--key value``; a list gives its items, a mapping its JSON.

    A ``null`` value is left out: the flag keeps its default, as when it is not given.
    """
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def read_flags(
    parser: argparse.ArgumentParser,
    argv: list[str],
    from_file: frozenset[str] | None = None,
    left_to_others: frozenset[str] | None = None,
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Parse ``argv`` and its ``--config FILE`` with ``parser``, the command line over the file.

    Args:
        parser: the command's parser (an ``HfArgumentParser`` too); a ``config`` value it holds is dropped.
        argv: the command line.
        from_file: the keys this command takes from the file; default every flag ``parser`` knows.
        left_to_others: when given, the only other keys the file may hold (other commands' flags).

    Returns:
        ``(values, unknown, others)``: every flag's value by name (its default when not given), the
        command-line strings ``parser`` does not know, and the file's keys it left to other commands.

    Raises:
        ConfigError: the config file cannot be read, or holds a key outside ``left_to_others``.
        SystemExit: argparse's own usage errors (exit code 2) and ``--help`` (0).
    """
    path, rest = split_config(argv)
    file_values = read_config(path) if path else {}
    known = {action.dest for action in parser._actions} if from_file is None else from_file
    taken = {key: value for key, value in file_values.items() if key in known}
    others = {key: value for key, value in file_values.items() if key not in known}
    strangers = [key for key in others if left_to_others is not None and key not in left_to_others]
    if strangers:
        plural = "s" if len(strangers) > 1 else ""
        raise ConfigError(f"--config {path}: unknown key{plural} {', '.join(strangers)} (no flag of that name)")
    namespace, unknown = parser.parse_known_args([*as_argv(taken), *rest])
    values = vars(namespace)
    values.pop("config", None)
    return values, unknown, others


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``argparse`` parser for a subcommand, with ``--config`` and the folder flags every command takes.

    A command that does not use a folder accepts it all the same, so the daemon's command line
    and config file serve every command.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=CONFIG_HELP + " Only its folder keys are read here.")
    for name, field in FOLDER_FLAGS.items():
        parser.add_argument(f"--{name}", default=field.default, help=f"{field.metadata['help']} (default: %(default)s)")
    return parser


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a subcommand's ``argv`` (from :func:`command_parser`): the folders may come from ``--config``.

    Raises:
        ConfigError: the config file cannot be read.
        SystemExit: a usage error (exit code 2), an unknown flag among them.
    """
    values, unknown, _ = read_flags(parser, argv, from_file=frozenset(FOLDER_FLAGS))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return argparse.Namespace(**values)
