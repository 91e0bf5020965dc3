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
import shutil
import signal
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


def main(argv: list[str]) -> int:
    """Parse the flags, serve until SIGINT or SIGTERM; returns the exit code.

    Raises:
        ConfigError: a flag's value is wrong, or the output folder is missing (one line, exit 1).
    """
    args = parse_command(_parser(), argv)
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is not a folder: start the daemon (or train a file) first")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {args.port}")
    if not args.poll_seconds > 0:
        raise ConfigError(f"--poll_seconds must be > 0, not {args.poll_seconds}")

    import uvicorn
    from transformers.cli.serving.model_manager import ModelLoader
    from transformers.cli.serving.utils import GenerationState

    from daemon.config import configure_logging
    from daemon.serving.app import build_app
    from daemon.serving.engines import ExportModels
    from daemon.serving.follower import ExportFollower, work_dir

    configure_logging()
    try:
        loader = ModelLoader(device=args.device, dtype=args.dtype)
    except ValueError as e:  # transformers' message names the value
        raise ConfigError(f"--dtype: {e}") from e
    generation_state = GenerationState()
    name = args.served_model_name or output_dir.resolve().name
    models = ExportModels(loader, generation_state, name, str(output_dir))
    snapshots = work_dir(output_dir)
    follower = ExportFollower(models, output_dir, snapshots, loader, generation_state, args.poll_seconds)
    server = uvicorn.Server(uvicorn.Config(build_app(models, generation_state), host=args.host, port=args.port))
    logger.info("serving %s as '%s' on http://%s:%d/v1", output_dir, name, args.host, args.port)
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _second_one_exits)
    follower.start()
    try:
        server.run()  # until SIGINT or SIGTERM (uvicorn's handlers): requests in progress finish first
    finally:
        follower.close()
        models.close()
        shutil.rmtree(snapshots, ignore_errors=True)
    return 0


def _second_one_exits(signum: int, _frame: object) -> None:
    """The handler uvicorn raises its stopping signal again to once stopped: cleanup follows, a second one exits."""
    signal.signal(signum, signal.SIG_DFL)
