"""The HTTP API, one router per concern: search, items, ops, admin, the web page."""
from __future__ import annotations

from typing import Any

from ..models import ErrorBody


def ERRORS(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the one error body."""
    return {c: {"model": ErrorBody} for c in codes}
