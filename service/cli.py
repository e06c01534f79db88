"""`service --index DIR [--host H] [--port P] [--config FILE]` and `service demo [...]`.

Argument parsing only; `service.serve` loads and serves. Every flag has a `SERVICE_*`
environment twin (see `service.settings`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from pydantic import ValidationError

from .demo import demo_main
from .serve import EXIT_USER, fail, serve, settings_from_args
from .settings import ConfigFileError


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        if argv[:1] == ["demo"]:
            return demo_main(argv[1:])
        args = _serve_parser().parse_args(argv)
        settings = settings_from_args(args)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        return fail(EXIT_USER, f"invalid setting {where}: {err.get('msg')}")
    except ConfigFileError as e:
        return fail(EXIT_USER, str(e))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:  # a config file's syntax
        where = getattr(args, "config", None) or os.environ.get("SERVICE_CONFIG_FILE") or "the config file"
        return fail(EXIT_USER, f"cannot read {where}: {e}")
    return serve(settings)


if __name__ == "__main__":
    raise SystemExit(main())
