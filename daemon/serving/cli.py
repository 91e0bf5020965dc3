"""``python -m daemon serve``: an OpenAI-compatible server of the exported model that follows each new export.

python -m daemon serve [--output_dir current_model] [--host 127.0.0.1] [--port 8000]
    [--served_model_name NAME] [--device auto] [--dtype auto] [--poll_seconds 1]

transformers' own server (``transformers serve``: its FastAPI app, request handlers and model
processes), with one model, the export of ``--output_dir``: each new export is loaded beside the
one serving and swapped in once ready (:mod:`daemon.serving.follower`), requests in progress finish
on the model they started with (:mod:`daemon.serving.engines`), and every answer names the
``global_step`` of the export that gave it in its ``X-Global-Step`` header. Endpoints:
``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from importlib import metadata
from pathlib import Path

from daemon.config_file import command_parser, parse_command
from daemon.exceptions import ConfigError

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m daemon serve", "Serve the exported model over an OpenAI-compatible API.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: %(default)s, loopback).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default: %(default)s).")
    parser.add_argument(
        "--served_model_name",
        help="The model's name in requests and responses (default: the output folder's name, e.g. current_model).",
    )
    parser.add_argument(
        "--device", default="auto", help="Device of the model: auto, cpu, cuda, cuda:1 ... (default: %(default)s)."
    )
    parser.add_argument(
        "--dtype", default="auto", help="dtype of the model: auto (the weights'), bfloat16 ... (default: %(default)s)."
    )
    parser.add_argument(
        "--poll_seconds",
        type=float,
        default=1.0,
        help="Seconds between two looks at export.json for a new export (default: %(default)s).",
    )
    return parser


TESTED_TRANSFORMERS = "5.25"  # the transformers whose serving internals daemon/serving is written against


def main(argv: list[str]) -> int:
    """Parse the flags, serve until SIGINT or SIGTERM; returns the exit code.

    The port is taken and ``--device`` checked before anything loads, so either mistake ends the
    command at once.

    Raises:
        ConfigError: a flag's value is wrong (a port in use, a device this machine lacks), the
            output folder is missing or not writable, or the installed transformers lacks the
            serving code this server builds on (one line, exit 1).
    """
    args = parse_command(_parser(), argv)
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is not a folder: start the daemon (or train a file) first")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {args.port}")
    if not args.poll_seconds > 0:
        raise ConfigError(f"--poll_seconds must be > 0, not {args.poll_seconds}")
    listening = listen(args.host, args.port)
    try:
        return _serve(args, output_dir, listening)
    finally:
        listening.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (uvicorn listens on it), before any model loads.

    Raises:
        ConfigError: the address cannot be taken (a port in use, an address not of this machine).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn.Config.bind_socket
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from e
    return sock


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine does not have (``cuda`` without a GPU, ``cuda:3`` with two).

    ``auto`` and device_map's strategies (``balanced`` ...) are accepted as they are; a bare
    number is an index of the machine's accelerator, as transformers takes it.

    Raises:
        ConfigError: the device is not one torch knows, or this machine lacks it.
    """
    import torch

    if device in ("auto", "balanced", "balanced_low_0", "sequential"):
        return
    if device.isdigit():
        count = torch.accelerator.device_count()
        if int(device) >= count:
            raise ConfigError(f"--device {device}: this machine has {count} accelerator(s)")
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device} is not a device: auto, cpu, cuda, cuda:1 ... ({e})") from e
    if parsed.type in ("cpu", "meta"):
        return
    backend = getattr(torch, parsed.type, None)  # None for a type torch names but has no module for here (hpu, xla)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ConfigError(f"--device {device}: this machine has no {parsed.type} device (torch sees none)")
    device_count = getattr(backend, "device_count", None)
    if parsed.index is not None and callable(device_count) and parsed.index >= device_count():
        raise ConfigError(f"--device {device}: this machine has {device_count()} {parsed.type} device(s)")


def _serve(args: argparse.Namespace, output_dir: Path, listening: socket.socket) -> int:
    try:
        import uvicorn
        from transformers.cli.serving.model_manager import ModelLoader
        from transformers.cli.serving.utils import GenerationState

        from daemon.serving.app import build_app
        from daemon.serving.engines import ExportModels
        from daemon.serving.follower import ExportFollower, release_work_dir, work_dir
    except ImportError as e:  # an older transformers: its serving code lacks what this server builds on
        raise ConfigError(
            f"python -m daemon serve needs transformers {TESTED_TRANSFORMERS} (tested; installed: "
            f"{_installed('transformers')}): pip install 'transformers[serving]>={TESTED_TRANSFORMERS},<6' ({e})"
        ) from e
    from daemon.config import configure_logging

    configure_logging()
    check_device(args.device)
    try:
        loader = ModelLoader(device=args.device, dtype=args.dtype)
    except ValueError as e:  # transformers' message names the value
        raise ConfigError(f"--dtype: {e}") from e
    generation_state = GenerationState()
    name = args.served_model_name or output_dir.resolve().name
    models = ExportModels(loader, generation_state, name, str(output_dir))
    try:
        snapshots = work_dir(output_dir)
    except OSError as e:
        raise ConfigError(f"cannot make the server's snapshot folder in {output_dir}: {e}") from e
    try:
        follower = ExportFollower(models, output_dir, snapshots, loader, generation_state, args.poll_seconds)
        server = uvicorn.Server(uvicorn.Config(build_app(models, generation_state), host=args.host, port=args.port))
        host, port = listening.getsockname()[:2]
        logger.info("serving %s as '%s' on http://%s:%d/v1", output_dir, name, host, port)
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, _second_one_exits)
        follower.start()
        try:
            server.run(sockets=[listening])  # until SIGINT or SIGTERM (uvicorn's): requests in progress finish first
        finally:
            follower.close()  # nothing is swapped in after it: models.close() stops every engine
            models.close()
    finally:
        release_work_dir(snapshots)
    return 0


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _second_one_exits(signum: int, _frame: object) -> None:
    """The handler uvicorn raises its stopping signal again to once stopped: cleanup follows, a second one exits."""
    signal.signal(signum, signal.SIG_DFL)
