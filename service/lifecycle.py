"""The app's lifespan: load the configured index at startup (in the background unless told
otherwise), reload it on SIGHUP, follow a sibling worker's announced index, close on exit."""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI

from .accesslog import redact_access_log
from .engine import Engine, IndexLoadError
from .peers import RELOAD_SIGNAL, Peers

log = logging.getLogger("service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    peers: Peers | None = app.state.peers
    settings = engine.settings
    task = None
    announced = peers.claim() if peers is not None else None  # what the sibling workers serve now
    if not engine.ready and settings.index_dir is not None:
        seq, first = announced if announced else (None, None)
        if settings.background_load:
            engine.loading = True
            task = asyncio.create_task(load_logged(engine, first, peers, seq))  # marks it applied once loaded
        else:
            await engine.load(first)
            if seq is not None:
                peers.applied = seq
    redact_access_log()  # again, in case the server's logging setup ran after create_app
    handlers = _install_signals(engine, peers)
    try:
        yield
    finally:
        for sig in handlers:
            asyncio.get_running_loop().remove_signal_handler(sig)
        if task is not None and not task.done():
            task.cancel()
        engine.close()


async def load_logged(engine: Engine, target: Path | None = None, peers: Peers | None = None,
                      seq: int | None = None) -> None:
    try:
        await engine.load(target)
    except IndexLoadError as e:
        log.error("%s", e)
        return
    if peers is not None and seq is not None:
        peers.applied = seq


def _install_signals(engine: Engine, peers: Peers | None) -> list[int]:
    """SIGHUP reloads the configured index dir (point a symlink at a new version, then HUP);
    under `--workers`, the reload signal loads the index a sibling announced."""
    if not hasattr(signal, "SIGHUP"):
        return []

    def on_hup() -> None:
        log.info("SIGHUP: reloading %s", engine.settings.index_dir)
        asyncio.ensure_future(load_logged(engine))

    def on_announce() -> None:
        pending = peers.claim()
        if pending is not None:
            log.info("a sibling worker announced %s: loading it", pending[1])
            asyncio.ensure_future(load_logged(engine, pending[1], peers, pending[0]))

    wanted = [(signal.SIGHUP, on_hup)]
    if peers is not None:
        wanted.append((RELOAD_SIGNAL, on_announce))
    installed = []
    for sig, fn in wanted:
        try:
            asyncio.get_running_loop().add_signal_handler(sig, fn)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests), or no signals
            break
        installed.append(sig)
    return installed
