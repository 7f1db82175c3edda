"""Running the application under uvicorn with a shutdown that does not wait for long
generations: on SIGTERM / SIGINT new requests get 503 and those in flight end at once."""
from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

from ..engine.async_engine import AsyncEFTEngine
from .app import build_app

SHUTDOWN_GRACE_S = 5


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM / SIGINT first ends the engine's requests, so that
    their connections close and the graceful shutdown is over in about one engine step; the
    process then exits normally (status 0) instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEFTEngine):
        super().__init__(config)
        self.engine = engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.server.shutting_down = True
        self.engine.abort_all()
        super().handle_exit(sig, frame)


def serve(engine: AsyncEFTEngine, *, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Serve ``engine`` until SIGTERM / SIGINT, then shut it down (its tensor-parallel workers too)."""
    try:
        app = build_app(engine, served_model_name=served_model_name, api_key=api_key)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        Server(config, engine).run()
    finally:
        engine.shutdown()
