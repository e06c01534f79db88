"""The access log without query strings: what a client puts in a URL never reaches the logs.

The API takes its key in a header only (X-API-Key or Authorization: Bearer), but a client can
still put a secret in a URL (an old `?api_key=` link, a token some proxy appends), and uvicorn's
access log writes the full URL. This filter on the `uvicorn.access` logger keeps the path and
replaces the query string by `?[redacted]` before any handler formats the line; no route of
this service reads a query parameter, so nothing of use is lost.
"""
from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[redacted]"


class RedactQueryStrings(logging.Filter):
    """uvicorn logs `'%s - "%s %s HTTP/%s" %d'` with (client, method, path?query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(record.msg, str) and "?" in record.msg and not args:
            record.msg = _redact(record.msg)
        return True


def _redact(text: str) -> str:
    out = []
    for word in text.split(" "):
        path, sep, _ = word.partition("?")
        out.append(f"{path}?{REDACTED}" if sep else word)
    return " ".join(out)


def redact_access_log() -> None:
    """Install the filter once per process (uvicorn's logging config keeps a logger's filters)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactQueryStrings) for f in logger.filters):
        logger.addFilter(RedactQueryStrings())
