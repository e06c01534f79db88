"""What the routers share, as FastAPI dependencies: the engine, the index handle a request
uses from start to end, and the API key checks.

A request reads `current_handle` once: a hot swap replacing the engine's handle mid-request
cannot mix two indexes in one answer (see `service.engine`).
"""
from __future__ import annotations

import secrets

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .engine import Engine, IndexHandle
from .errors import ClientError
from .settings import ServiceSettings

# The key travels in a header only: a URL (query string) ends up in access logs, proxies and browser history.
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
bearer_scheme = HTTPBearer(auto_error=False)


# every dependency is `async def`: FastAPI runs a plain `def` one on its thread pool, a thread hop
# per dependency per request (measurable at concurrency 8 on 2 cores)
async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def current_handle(engine: Engine = Depends(get_engine)) -> IndexHandle:
    """The index this request is answered from (503 `NotReady` when none is served)."""
    return engine.handle


def protected(settings: ServiceSettings) -> bool:
    """Operations endpoints need the key too (a key is set and `public_ops` is off)."""
    return settings.api_key is not None and not settings.public_ops


async def require_key(settings: ServiceSettings = Depends(get_settings),
                      header: str | None = Security(api_key_header),
                      bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme)) -> None:
    check_key(settings.api_key, presented(header, bearer))


async def require_key_for_ops(settings: ServiceSettings = Depends(get_settings),
                              header: str | None = Security(api_key_header),
                              bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme)) -> None:
    if protected(settings):
        check_key(settings.api_key, presented(header, bearer))


def may_see_details(request: Request) -> bool:
    """Whether the caller may see server-side details (which index, load errors)."""
    settings: ServiceSettings = request.app.state.settings
    if not protected(settings):
        return True
    given = presented(request.headers.get("x-api-key"), _bearer_of(request.headers.get("authorization")))
    return any(key_matches(k, given) for k in (settings.api_key, settings.admin_key) if k is not None)


def presented(header: str | None, bearer: HTTPAuthorizationCredentials | str | None) -> str | None:
    """The key a request presents: the X-API-Key header, else an `Authorization: Bearer` token."""
    if isinstance(bearer, HTTPAuthorizationCredentials):
        bearer = bearer.credentials
    return header or bearer or None


def _bearer_of(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def key_matches(expected: SecretStr, given: str | None) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), expected.get_secret_value().encode())


def check_key(expected: SecretStr | None, given: str | None) -> None:
    if expected is None:
        return
    if not key_matches(expected, given):
        raise ClientError(401, "missing or wrong API key (send it in the X-API-Key header or as "
                               "Authorization: Bearer; never in the URL)", headers={"WWW-Authenticate": "Bearer"})
