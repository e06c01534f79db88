"""Start serving an index: load it in the foreground, then run uvicorn (one process, or
`--workers N` processes on one port). Shared by `service` and `service demo`.

The index is loaded before the port opens, so a wrong directory or checkpoint ends the command
at once with one line on stderr (exit 2 for a usage mistake, 1 for an index that will not
load) instead of a server that never becomes ready.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .engine import default_loader
from .integrity import Verification
from .settings import ServiceSettings
from .workers import check_loads, serve_workers

EXIT_USER = 2
EXIT_LOAD = 1


def fail(code: int, message: str) -> int:
    print(f"service: {message}", file=sys.stderr)
    return code


def settings_from_args(args: argparse.Namespace, **extra) -> ServiceSettings:
    """CLI flags override environment and file; absent flags leave them alone."""
    overrides = {k: v for k, v in {"index_dir": getattr(args, "index", None), "host": args.host, "port": args.port,
                                   "config_file": args.config, "checkpoint": getattr(args, "checkpoint", None),
                                   "device": args.device,
                                   "workers": getattr(args, "workers", None), **extra}.items() if v is not None}
    return ServiceSettings(**overrides)


def serve(settings: ServiceSettings, index_dir: Path | None = None) -> int:
    """Load the index in the foreground, then run uvicorn until interrupted."""
    target = index_dir or settings.index_dir
    if target is None:
        return fail(EXIT_USER, "no index given: pass --index DIR or set SERVICE_INDEX_DIR")
    if not Path(target).is_dir():
        return fail(EXIT_USER, f"index directory not found: {target}")
    settings = settings.model_copy(update={"index_dir": Path(target)})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        reason = check_loads(settings, Path(target))
        if reason:
            return fail(EXIT_LOAD, f"cannot load index {target}: {reason}")
        print(f"service: serving {target} on http://{settings.host}:{settings.port}/ with {settings.workers} "
              "worker processes", file=sys.stderr)
        return serve_workers(settings, Path(target))
    try:  # checksums first (all but the token segments, which are hashed once it serves): see service.integrity
        verification = Verification.before_load(Path(target).resolve(), settings.verify)
        searcher = default_loader(settings)(Path(target).resolve())
    except Exception as e:  # a bad index/checkpoint is the user's to fix: one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return fail(EXIT_LOAD, f"cannot load index {target}: {msg}")
    app = create_app(settings, searcher=searcher, verification=verification)
    print(f"service: serving {target} on http://{settings.host}:{settings.port}/", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_keep_alive=int(settings.keep_alive_s))
    return 0
