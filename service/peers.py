"""How the worker processes of `service --workers N` reach each other: the control file that
records the last announced index and the supervisor's signal that wakes the others.

Kept apart from `service.workers` (which starts the processes and builds each one's app) so the
app can react to a sibling's announcement without importing the process supervisor.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

SETTINGS_ENV = "TGDT_SERVICE_SETTINGS"  # path of the resolved settings (JSON)
CONTROL_ENV = "TGDT_SERVICE_CONTROL"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch to multiprocess mode
RELOAD_SIGNAL = signal.SIGUSR1


class Peers:
    """A worker's link to its siblings: the shared control file and the supervisor's pid."""

    def __init__(self, control: Path, supervisor_pid: int):
        self.control = Path(control)
        self.supervisor_pid = supervisor_pid
        self.applied: int | None = None  # sequence number of the last announced target loaded here
        self._claimed: int | None = None  # ... or being loaded here now
        self._lock = threading.Lock()

    def current(self) -> tuple[int, Path] | None:
        """The last announced (sequence, index dir), if any worker has announced one."""
        try:
            data = json.loads(self.control.read_text())
            return int(data["seq"]), Path(data["index_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def announce(self, index_dir: Path) -> None:
        """This worker now serves `index_dir`: write it down atomically and wake the siblings."""
        with self._lock:
            seq = time.time_ns()  # unique across workers and across a SIGHUP that drops the file
            tmp = self.control.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"seq": seq, "index_dir": str(Path(index_dir).resolve())}))
            os.replace(tmp, self.control)
            self.applied = self._claimed = seq
        os.kill(self.supervisor_pid, RELOAD_SIGNAL)

    def claim(self) -> tuple[int, Path] | None:
        """The announced target when this worker has neither loaded it nor started loading it
        (a second signal during a load must not queue the same load again)."""
        with self._lock:
            cur = self.current()
            if cur is None or cur[0] in (self.applied, self._claimed):
                return None
            self._claimed = cur[0]
            return cur
