"""Run an app under uvicorn with a graceful shutdown on SIGTERM and Ctrl-C.

On the first signal uvicorn stops accepting connections and lets in-flight requests finish for up to
`shutdown_timeout` seconds; then `on_shutdown_timeout` aborts the rest (each client gets a 503, or an
error event and `data: [DONE]` on a stream), uvicorn cancels whatever still runs a few seconds later,
and the app's shutdown stops the engine. A second Ctrl-C skips the wait: the requests still running are
aborted at once, so each still gets its 503 or its error event and `[DONE]` (a third one exits without
waiting for anything). Unlike plain uvicorn, the process then exits 0 instead of re-raising the signal: a
requested shutdown that went well is a success; signals that arrive after the server stopped are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator

import uvicorn

logger = logging.getLogger("effllm.serve")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CANCEL_AFTER_ABORT = 5.0  # seconds aborted handlers get to answer before uvicorn cancels them


class Server(uvicorn.Server):
    """uvicorn's server, exiting normally after a signal; `port` is the bound port once started."""

    def __init__(
        self,
        config: uvicorn.Config,
        shutdown_timeout: float | None = None,
        on_shutdown_timeout: Callable[[], None] | None = None,
    ):
        super().__init__(config)
        self.port: int | None = None
        self.shutdown_timeout = shutdown_timeout
        self.on_shutdown_timeout = on_shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    def handle_exit(self, sig: int, frame) -> None:
        """First signal: shut down gracefully. Second: abort what still runs (answered properly). Third: force."""
        self._signals += 1
        if self._signals == 2 and self.on_shutdown_timeout is not None and self._loop is not None:
            logger.warning("second signal: aborting the requests still running")
            self._loop.call_soon_threadsafe(self.on_shutdown_timeout)
            return
        super().handle_exit(sig, frame)
        if self._signals >= 2:
            self.force_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            logger.info("serving on http://%s:%d (Ctrl-C or SIGTERM to stop)", self.config.host, self.port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = None
        if self.on_shutdown_timeout is not None and self.shutdown_timeout is not None:
            timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self._abort_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()
        logger.info("shut down")

    def _abort_in_flight(self) -> None:
        if self.server_state.tasks:
            logger.warning(
                "aborting %d request(s) still running after %g s",
                len(self.server_state.tasks),
                self.shutdown_timeout,
            )
        self.on_shutdown_timeout()


def make_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float | None = 30.0,
    on_shutdown_timeout: Callable[[], None] | None = None,
    log_level: str = "info",
) -> Server:
    """A server for `app` (port 0 picks a free one; read `server.port` once `server.started`).

    shutdown_timeout: seconds in-flight requests get after a signal (None: as long as they need);
    on_shutdown_timeout: called when that runs out, to abort them (e.g. `AsyncEngine.abort_all`).
    """
    hard_limit = None
    if shutdown_timeout is not None:
        hard_limit = shutdown_timeout + (_CANCEL_AFTER_ABORT if on_shutdown_timeout is not None else 0)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=hard_limit,
        log_config=None,
    )
    return Server(config, shutdown_timeout, on_shutdown_timeout)


def run_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float | None = 30.0,
    on_shutdown_timeout: Callable[[], None] | None = None,
    log_level: str = "info",
) -> None:
    """Serve `app` until SIGTERM or Ctrl-C, then shut down gracefully and return."""
    make_server(
        app,
        host,
        port,
        shutdown_timeout=shutdown_timeout,
        on_shutdown_timeout=on_shutdown_timeout,
        log_level=log_level,
    ).run()
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:  # the server is down: a late Ctrl-C must not turn a clean exit into a kill
            signal.signal(sig, signal.SIG_IGN)
