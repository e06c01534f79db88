"""The served index checked against its manifest's sha256 checksums, at load and at every swap.

The manifest records a sha256 per file; an index whose bytes changed since it was built (a disk
error, a partial copy, a hand edit) would otherwise serve wrong answers while reporting healthy.

How it stays fast at 1M images (a ~13 GB token store): sha256 runs at ~0.8 GB/s on one core of
the 2-core dev box under load (SHA-NI; BENCHMARKS.md, `bench/bench_verify.py`), ~16 s for 13 GB. So
  * before an index is opened, every file but the token segments is hashed (the FAISS files,
    the SQLite metadata, the codecs: MBs to ~1 GB) and the load fails if one does not match;
  * on a first load (`SERVICE_VERIFY=background`, the default) the token segments are hashed on
    a background thread once the index serves; /readyz says `verified: pending` until then, and
    a mismatch makes the service not ready (503 on /readyz and on searches) and logs the file;
  * a hot swap (/admin/reload, SIGHUP) hashes every file *before* the swap and refuses an index
    that fails, so the index being served stays; `SERVICE_VERIFY=full` does that on the first
    load too, `off` skips the checks.
Problems name files relative to the index directory, never by their server path.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from indexer.manifest import MANIFEST, Manifest, read_manifest, segment_names, verify_files

log = logging.getLogger("service.integrity")

OK, PENDING, FAILED = "ok", "pending", "failed"
OFF, UNCHECKED = "off", "unchecked"  # checks switched off; an index without a manifest (in-memory, tests)


class VerifyError(ValueError):
    """Files of the index do not match the checksums its manifest records."""


class Verification:
    """What is known about one loaded index's files; `state` moves pending -> ok | failed once."""

    def __init__(self, state: str, folder: Path | None = None, manifest: Manifest | None = None,
                 pending: list[str] | None = None, checked_bytes: int = 0, seconds: float = 0.0):
        self.state = state
        self.folder = folder
        self.manifest = manifest
        self.pending = list(pending or [])
        self.problems: list[str] = []
        self.checked_bytes = checked_bytes
        self.total_bytes = sum(int(f["bytes"]) for f in manifest.files.values()) if manifest else 0
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def before_load(cls, folder: Path, mode: str = "background", swap: bool = False) -> "Verification":
        """Hash what must match before the index is opened: everything for a swap or `mode=full`,
        all but the token segments otherwise. Raises VerifyError naming the failing files."""
        folder = Path(folder)
        if mode == OFF:
            return cls(OFF)
        if not (folder / MANIFEST).is_file():
            return cls(UNCHECKED)  # not an index: the loader says why
        m = read_manifest(folder)
        later = [] if swap or mode == "full" else segment_names(m)
        now = [n for n in m.files if n not in later]
        t0 = time.perf_counter()
        problems = verify_files(folder, m, now)
        if problems:
            raise VerifyError(f"index failed verification: {'; '.join(problems)}")
        done = sum(int(m.files[n]["bytes"]) for n in now)
        return cls(PENDING if later else OK, folder, m, later, done, time.perf_counter() - t0)

    def start(self, label: str, on_done: Callable[["Verification"], None] | None = None) -> None:
        """Hash the pending files on a daemon thread (no-op when nothing is pending)."""
        if self.state != PENDING or self._thread is not None:
            return

        def run() -> None:
            t0 = time.perf_counter()

            def progress(n: int) -> None:
                self.checked_bytes += n

            problems = verify_files(self.folder, self.manifest, self.pending, stop=self._stop.is_set,
                                    on_bytes=progress)
            if self._stop.is_set():
                return  # swapped out before the end: no longer served, nothing to report
            self.seconds += time.perf_counter() - t0
            self.problems = problems
            self.state = FAILED if problems else OK
            if problems:
                log.error("%s failed verification, not serving it: %s", label, "; ".join(problems))
            else:
                log.info("%s verified: %.1f MB hashed in %.1fs", label, self.checked_bytes / 1e6, self.seconds)
            if on_done is not None:
                on_done(self)

        self._thread = threading.Thread(target=run, name="index-verify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The index is no longer served: a background check still running gives up."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state != PENDING

    def summary(self) -> dict:
        return {"state": self.state, "problems": list(self.problems), "checked_bytes": self.checked_bytes,
                "total_bytes": self.total_bytes, "seconds": round(self.seconds, 3)}
