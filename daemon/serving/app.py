"""The server's FastAPI app: transformers' own (``transformers serve``), its handlers given :class:`ExportModels`.

The handlers are wired as ``transformers.cli.serve.Serve.run`` wires them, with the export's
models instead of a model per requested name, and :class:`StepHeader` around them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.systemone import SystemOneHandler
from transformers.cli.serving.transcription import TranscriptionHandler
from transformers.cli.serving.utils import GenerationState

from daemon.serving.engines import ExportModels, StepHeader

if TYPE_CHECKING:
    from fastapi import FastAPI


def build_app(models: ExportModels, generation_state: GenerationState) -> FastAPI:
    """transformers' OpenAI-compatible app answering with ``models``' current export.

    Args:
        models: the export's models (:class:`daemon.serving.engines.ExportModels`).
        generation_state: how the models generate (transformers' defaults here).

    Returns:
        The app, for uvicorn.
    """
    app = build_server(
        models,
        ChatCompletionHandler(model_manager=models, generation_state=generation_state),
        completion_handler=CompletionHandler(model_manager=models, generation_state=generation_state),
        response_handler=ResponseHandler(model_manager=models, generation_state=generation_state),
        transcription_handler=TranscriptionHandler(models),
        systemone_handler=SystemOneHandler(model_manager=models, generation_state=generation_state),
    )
    app.add_middleware(StepHeader, models=models)  # the outermost: the leases end after the whole response
    return app
