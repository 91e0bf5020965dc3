"""The one model the server answers with: the newest loaded export, and the requests each export is answering.

Built on transformers' serving (``transformers serve``): each export is a
``transformers.cli.serving.model_manager.EngineClient``, its model in a process of its own, and
:class:`ExportModels` is the ``ModelManager`` the request handlers ask for it (``get_engine``).
A request is answered by the export that was current when its handler asked: it *leases* that
engine until its response is sent (:class:`StepHeader`, which also names the export's step in the
``X-Global-Step`` header). A new export is swapped in only once loaded, and the export it replaces
is stopped only when its last lease ends, so no request fails or changes model half-way.
"""

from __future__ import annotations

import contextvars
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import MutableHeaders
from transformers.cli.serving.model_manager import EngineClient, ModelLoader, ModelManager
from transformers.cli.serving.utils import GenerationState, ModelNotServedError

GLOBAL_STEP_HEADER = "X-Global-Step"
LOADING_RETRY_SECONDS = 5  # Retry-After of a request while the first export loads (SmolLM2: about 5 s on 2 cores)

# The engines the request being handled leased: set by StepHeader around each HTTP request.
_LEASES: contextvars.ContextVar[list[ExportEngine] | None] = contextvars.ContextVar("export_leases", default=None)


class ExportEngine(EngineClient):
    """One export, loaded: transformers' engine for the snapshot folder (:mod:`daemon.store.export_snapshot`).

    Constructing it loads the model in its own process and returns once it is ready.

    Args:
        folder: the export's snapshot, which stays as it is while this engine runs.
        global_step: the step the export holds (its ``export.json``).
        served_name: the model's name in requests and responses.
        loader, generation_state: transformers' loading and generation settings.

    Raises:
        RuntimeError: the model does not load (transformers' message, with the cause).
        OSError, ValueError: its config or tokenizer does not read.
    """

    def __init__(
        self, folder: Path, global_step: int, served_name: str, loader: ModelLoader, generation_state: GenerationState
    ) -> None:
        super().__init__(str(folder), loader, generation_state, timeout=-1)  # -1: never stopped for being idle
        self.folder, self.global_step, self.leases = folder, global_step, 0
        self.start()
        # Responses name the model as requests do. The process has loaded from the folder already, and is never
        # restarted: a retired engine has no lease left, and is not handed out any more.
        self.model_id = served_name


class ExportModels(ModelManager):
    """transformers' ``ModelManager`` serving one model, the current export, replaced by :meth:`swap`.

    Args:
        loader, generation_state: transformers' loading and generation settings, for every export.
        served_name: the name requests give the model (``model``); a request may also leave it out.
        output_dir: the folder followed, for messages.
    """

    def __init__(
        self, loader: ModelLoader, generation_state: GenerationState, served_name: str, output_dir: str
    ) -> None:
        super().__init__(loader, generation_state, model_timeout=-1)
        self.served_name, self.output_dir = served_name, output_dir
        self.current: ExportEngine | None = None
        self.loading: int | None = None  # the step the follower is loading, while nothing is served yet
        self.retiring: list[ExportEngine] = []
        self._lock = threading.Lock()

    def get_engine(self, model: str | None) -> EngineClient:
        """The current export's engine, leased to the request being handled (see :class:`StepHeader`).

        Raises:
            ModelNotServedError: ``model`` is another name than the served one (a 400).
            HTTPException: no export is loaded (a 503, which clients retry): one is loading (with ``Retry-After``),
                there is none yet, or it was removed.
        """
        if model is not None and model != self.served_name:
            raise ModelNotServedError(f"this server serves '{self.served_name}'; the request names '{model}'")
        leases = _LEASES.get()
        with self._lock:
            engine = self.current
            if engine is None and self.loading is not None:  # the server's first seconds: the model is on its way
                raise HTTPException(
                    status_code=503,
                    detail=f"the export of {self.output_dir} (step {self.loading}) is loading: retry in a few seconds",
                    headers={"Retry-After": str(LOADING_RETRY_SECONDS)},
                )
            if engine is None:
                raise HTTPException(
                    status_code=503, detail=f"no export of {self.output_dir} is loaded (none yet, or removed)"
                )
            if leases is not None:
                engine.leases += 1
                leases.append(engine)
        return engine

    def release(self, engines: list[ExportEngine]) -> None:
        """End the leases of a request whose response was sent (or which ended otherwise)."""
        with self._lock:
            for engine in engines:
                engine.leases -= 1

    def swap(self, engine: ExportEngine | None) -> None:
        """Answer new requests with ``engine``; the one it replaces finishes its requests, then :meth:`stop_idle`.

        None: no model (the export was removed, a rollback to step 0): new requests get a 503.
        """
        with self._lock:
            if self.current is not None:
                self.retiring.append(self.current)
            self.current, self.loading = engine, None
            self.engines = {} if engine is None else {self.served_name: engine}

    def stop_idle(self) -> list[ExportEngine]:
        """Stop the replaced engines no request holds any more; returns them (their folders can go)."""
        with self._lock:
            idle = [engine for engine in self.retiring if engine.leases == 0]
            self.retiring = [engine for engine in self.retiring if engine.leases > 0]
        for engine in idle:
            engine.shutdown("replaced by a newer export")
        return idle

    def shutdown(self) -> None:
        """Nothing: the export stays loaded until :meth:`close`.

        transformers calls this on ``/reset`` (to free the models until a request loads one again)
        and when its app stops; here a model unloaded would stay so until the next export.
        """

    def close(self) -> None:
        """Stop every engine, the current one and those being replaced (the server is stopping)."""
        with self._lock:
            engines = [*self.retiring, *([self.current] if self.current is not None else [])]
            self.current, self.retiring, self.engines = None, [], {}
        for engine in engines:
            engine.shutdown("the server is stopping")

    @property
    def is_dead(self) -> bool:
        """Whether the current export's process died (``/health`` then answers 503)."""
        engine = self.current
        return engine is not None and engine.is_dead

    def list_models(self, cache_dir: str | None = None) -> list[dict]:
        """``/v1/models``: the served model, ``loaded`` once an export is, with its ``global_step`` (not OpenAI's)."""
        engine = self.current
        return [
            {
                "id": self.served_name,
                "object": "model",
                "created": 0,
                "owned_by": "local",
                "status": {"value": "unloaded" if engine is None else "loaded"},
                "global_step": None if engine is None else engine.global_step,
            }
        ]


class StepHeader:
    """ASGI middleware: each HTTP request's leases (:meth:`ExportModels.get_engine`), and its answer's step.

    The response names the ``global_step`` of the export that answered in :data:`GLOBAL_STEP_HEADER`;
    the leases end once the response is sent, or the request ends otherwise (a client gone, an
    error). A plain ASGI middleware, as transformers' own: a streamed answer's chunks pass through
    without a task of their own.
    """

    def __init__(self, app: Any, models: ExportModels) -> None:
        self.app, self.models = app, models

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[ExportEngine] = []
        token = _LEASES.set(leases)

        async def send_with_step(message: dict) -> None:
            if message["type"] == "http.response.start" and leases:
                MutableHeaders(scope=message)[GLOBAL_STEP_HEADER] = str(leases[-1].global_step)
            await send(message)

        try:
            await self.app(scope, receive, send_with_step)
        finally:
            _LEASES.reset(token)
            self.models.release(leases)
