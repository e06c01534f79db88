"""`service --index DIR [--host H] [--port P] [--config FILE]` and `service demo [...]`.

The index is loaded before the port opens, so a wrong directory or checkpoint ends the command
at once with one line on stderr (exit 2 for a usage mistake, 1 for an index that will not
load) instead of a server that never becomes ready. Every flag has a `SERVICE_*` environment
twin (see `service.settings`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path

EXIT_USER = 2
EXIT_LOAD = 1


def _fail(code: int, message: str) -> int:
    print(f"service: {message}", file=sys.stderr)
    return code


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="service", description="Serve an index over HTTP (search API + web page). "
                                "`service demo --help` builds and serves a demo index.")
    p.add_argument("--index", type=Path, help="index directory built by `indexer build` (or SERVICE_INDEX_DIR)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--config", type=Path, help="TOML or JSON settings file (or SERVICE_CONFIG_FILE)")
    p.add_argument("--checkpoint", type=Path, help="override the checkpoint the index names")
    p.add_argument("--device", help="torch device (default: CUDA when present, else CPU)")
    p.add_argument("--workers", type=int, help="server processes sharing the port (default 1; SERVICE_WORKERS)")
    return p


def settings_from_args(args: argparse.Namespace, **extra):
    """CLI flags override environment and file; absent flags leave them alone."""
    from .settings import ServiceSettings

    overrides = {k: v for k, v in {"index_dir": getattr(args, "index", None), "host": args.host, "port": args.port,
                                   "config_file": args.config, "checkpoint": getattr(args, "checkpoint", None),
                                   "device": args.device,
                                   "workers": getattr(args, "workers", None), **extra}.items() if v is not None}
    return ServiceSettings(**overrides)


def serve(settings, index_dir: Path | None = None) -> int:
    """Load the index in the foreground, then run uvicorn until interrupted."""
    target = index_dir or settings.index_dir
    if target is None:
        return _fail(EXIT_USER, "no index given: pass --index DIR or set SERVICE_INDEX_DIR")
    if not Path(target).is_dir():
        return _fail(EXIT_USER, f"index directory not found: {target}")
    import uvicorn  # heavy imports only once the arguments are known to be usable

    from .app import create_app
    from .engine import default_loader
    from .integrity import Verification

    settings = settings.model_copy(update={"index_dir": Path(target)})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        from .workers import check_loads, serve_workers

        reason = check_loads(settings, Path(target))
        if reason:
            return _fail(EXIT_LOAD, f"cannot load index {target}: {reason}")
        print(f"service: serving {target} on http://{settings.host}:{settings.port}/ with {settings.workers} "
              "worker processes", file=sys.stderr)
        return serve_workers(settings, Path(target))
    try:  # checksums first (all but the token segments, which are hashed once it serves): see service.integrity
        verification = Verification.before_load(Path(target).resolve(), settings.verify)
        searcher = default_loader(settings)(Path(target).resolve())
    except Exception as e:  # a bad index/checkpoint is the user's to fix: one line, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _fail(EXIT_LOAD, f"cannot load index {target}: {msg}")
    app = create_app(settings, searcher=searcher, verification=verification)
    print(f"service: serving {target} on http://{settings.host}:{settings.port}/", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_keep_alive=int(settings.keep_alive_s))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pydantic import ValidationError

    from .settings import ConfigFileError

    args = None
    try:
        if argv[:1] == ["demo"]:
            from .demo import demo_main

            return demo_main(argv[1:])
        args = _serve_parser().parse_args(argv)
        settings = settings_from_args(args)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        return _fail(EXIT_USER, f"invalid setting {where}: {err.get('msg')}")
    except ConfigFileError as e:
        return _fail(EXIT_USER, str(e))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:  # a config file's syntax
        where = getattr(args, "config", None) or os.environ.get("SERVICE_CONFIG_FILE") or "the config file"
        return _fail(EXIT_USER, f"cannot read {where}: {e}")
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
