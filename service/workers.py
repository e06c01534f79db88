"""Several server processes on one port (`service --workers N`).

Why: a search request is mostly native work (ONNX Runtime, FAISS, a GEMM) that releases the
GIL, but its Python glue (HTTP parsing, routing, validation, serialising the response) does
not, and in one process all of it queues on one interpreter lock. With N processes sharing the
listening socket the kernel spreads connections over N interpreters; the index's token store
is memory-mapped, so its pages are shared between them through the page cache.

What must still behave as one service:
  * hot swap: SIGHUP to the supervisor is forwarded to every worker (each swaps atomically in
    place, as a single process does) instead of uvicorn's default of restarting the workers;
    `POST /admin/reload` in one worker records its target in a control file and asks the
    supervisor (SIGUSR1) to make the others load it too. A worker started later (a crashed one's
    replacement) serves that same target. Every request is answered by one whole index; during
    the seconds of a swap two workers may answer from different generations.
  * metrics: prometheus_client's multiprocess mode, so /metrics sums all workers.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import uvicorn
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from .app import create_app
from .engine import default_loader
from .integrity import Verification
from .peers import CONTROL_ENV, METRICS_ENV, RELOAD_SIGNAL, SETTINGS_ENV, Peers
from .settings import ServiceSettings

def worker_app():
    """uvicorn factory run in each worker process."""
    settings = ServiceSettings(**json.loads(Path(os.environ[SETTINGS_ENV]).read_text()))
    return create_app(settings, peers=Peers(Path(os.environ[CONTROL_ENV]), os.getppid()))


def _load_once(settings_json: str, index_dir: str) -> str | None:
    try:
        settings = ServiceSettings(**json.loads(settings_json))
        Verification.before_load(Path(index_dir).resolve(), settings.verify)  # each worker hashes the segments
        default_loader(settings)(Path(index_dir).resolve())
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def check_loads(settings: ServiceSettings, index_dir: Path) -> str | None:
    """Load the index once in a throw-away process, before any port opens: a bad index or
    checkpoint ends `service` with one line instead of N workers failing in their logs, and the
    supervisor does not keep a copy of the index it will never serve."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_load_once, _settings_json(settings), str(index_dir)).result()


def _settings_json(settings: ServiceSettings) -> str:
    data = settings.model_dump(mode="json", exclude={"config_file"})
    for key in ("api_key", "admin_key"):  # SecretStr dumps as "**********"
        secret = getattr(settings, key)
        data[key] = None if secret is None else secret.get_secret_value()
    # a worker opens its port only once its index is loaded: the kernel hands connections to ready workers
    data["background_load"] = False
    return json.dumps(data)


def serve_workers(settings: ServiceSettings, index_dir: Path) -> int:
    """Run `settings.workers` worker processes on one socket under a supervisor; blocks."""
    class Supervisor(Multiprocess):
        def _forward(self, sig: int) -> None:
            for p in self.processes:
                if p.pid is not None and p.process.is_alive():
                    os.kill(p.pid, sig)

        def handle_hup(self) -> None:  # each worker reloads its configured index in place
            control.unlink(missing_ok=True)  # the configured dir is the truth again, for later workers too
            self._forward(signal.SIGHUP)

        def handle_usr1(self) -> None:  # a worker announced a new index through /admin/reload
            self._forward(RELOAD_SIGNAL)

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()
            for pid in before - {p.pid for p in self.processes}:  # a replaced worker's live gauges go
                if pid is not None:
                    multiprocess.mark_process_dead(pid, str(metrics_dir))

    with tempfile.TemporaryDirectory(prefix="tgdt-service-") as tmp:
        metrics_dir = Path(tmp) / "metrics"
        metrics_dir.mkdir()
        os.environ[METRICS_ENV] = str(metrics_dir)
        control = Path(tmp) / "reload.json"
        os.environ[CONTROL_ENV] = str(control)
        # resolved settings in a file of the private (0700) temp dir, not in the environment: they hold the keys
        resolved = Path(tmp) / "settings.json"
        resolved.touch(mode=0o600)
        resolved.write_text(_settings_json(settings.model_copy(update={"index_dir": Path(index_dir)})))
        os.environ[SETTINGS_ENV] = str(resolved)
        config = uvicorn.Config("service.workers:worker_app", factory=True, host=settings.host, port=settings.port,
                                workers=settings.workers, log_level=settings.log_level.lower(),
                                timeout_keep_alive=int(settings.keep_alive_s),
                                # a worker loads the index (and exports its text encoder) before it serves
                                timeout_worker_healthcheck=120)
        sock = config.bind_socket()
        try:
            Supervisor(config, sockets=[sock]).run()
        finally:
            sock.close()
    return 0
