"""Sharded serving: a stateless router that fans each query out to every shard and merges.

An index too large for one machine is built as N shard indexes (disjoint slices of the
collection); each shard is served by the ordinary `service` (one process or container per
replica). The router holds no index and no model: it forwards the request to one replica of
every shard, merges their re-ranked hits, and rewrites ids so `/items/{id}` and `/images/{id}`
reach the shard that owns them (global id = local id * N + shard).

Why plain HTTP replicas behind this router rather than Ray Serve: a shard is exactly the
single-box service (same image, health checks, hot swap, metrics), so it deploys with compose,
Kubernetes or systemd and needs no cluster runtime on the query path; the router is ~one HTTP
hop and itself replicates freely. Replicas of a shard give load spreading (round robin) and
failover (connection errors and 5xx move to the next replica).

Exact merge. Every shard ranks its own top-K candidates by the global score, re-ranks them with
the fused score and (asked for k' = K hits) returns all K with their global scores. The union
of the shards' top-K by global score contains the single index's top-K candidates, so the router
takes the top-K of the union by global score and orders those by the fused score, which depends
only on (query, candidate): the answer equals the single-index answer (exact FAISS stage one).
That needs K <= the shards' max_k (100 by default); deeper K, or candidates="auto", falls back
to merging each shard's top-k by fused score (recall at least the single index's).

    service-router --shard http://a:8000,http://a2:8000 --shard http://b:8000 --port 8080
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import sys
import time
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Path as PathParam, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import ImageSearchRequest, TextSearchRequest, confident
from .settings import HARD_MAX_K

RETRY_STATUS = {500, 502, 503, 504}


class RouterSettings(BaseSettings):
    """Router configuration (`ROUTER_` environment variables or CLI flags)."""

    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="forbid")

    shards: list[list[str]] = Field(..., min_length=1, description="per shard, the base URLs of its replicas")
    timeout_s: float = Field(30.0, gt=0, description="per shard request timeout")
    shard_max_k: int = Field(HARD_MAX_K, ge=1, le=HARD_MAX_K, description="the shards' max_k setting")
    default_candidates: int = Field(100, ge=1, description="K when a request names none (the shards' default)")
    api_key: SecretStr | None = Field(None, description="sent to the shards as X-API-Key")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)

    @field_validator("shards", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        # env form: "a,a2;b" (shards separated by ';', replicas by ',') or a JSON list of lists
        if isinstance(v, str) and not v.strip().startswith("["):
            return [[u.strip() for u in s.split(",") if u.strip()] for s in v.split(";") if s.strip()]
        return v

    @field_validator("shards")
    @classmethod
    def _nonempty(cls, v: list[list[str]]) -> list[list[str]]:
        if any(not replicas for replicas in v):
            raise ValueError("every shard needs at least one replica URL")
        return [[u.rstrip("/") for u in replicas] for replicas in v]


class ShardError(Exception):
    """A shard answered with a client error (forwarded as is) or no replica answered (503)."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("message", ""))
        self.status, self.body = status, body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": status, "message": message}, status_code=status)


class Router:
    """Replica choice, fan-out and merge; the FastAPI app below is a thin shell over it."""

    def __init__(self, settings: RouterSettings, client: httpx.AsyncClient | None = None):
        self.settings = settings
        self.n = len(settings.shards)
        self.client = client or httpx.AsyncClient(timeout=settings.timeout_s)
        self._rr = [itertools.cycle(range(len(r))) for r in settings.shards]
        self.headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}

    # ---- ids
    def global_id(self, shard: int, local: int | None) -> int | None:
        return None if local is None else local * self.n + shard

    def split_id(self, gid: int) -> tuple[int, int]:
        return gid % self.n, gid // self.n

    # ---- one shard, any replica
    async def call(self, shard: int, method: str, path: str, **kw) -> httpx.Response:
        replicas = self.settings.shards[shard]
        start = next(self._rr[shard])
        last = "no replica"
        for i in range(len(replicas)):
            url = replicas[(start + i) % len(replicas)] + path
            try:
                r = await self.client.request(method, url, headers=self.headers, **kw)
            except httpx.HTTPError as e:
                last = f"{url}: {type(e).__name__}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"{url}: HTTP {r.status_code}"
                continue
            return r
        raise ShardError(503, {"status": 503, "message": f"shard {shard} unavailable ({last})"})

    async def search(self, path: str, body: dict, k: int, candidates: Any) -> dict:
        exact = candidates != "auto" and max(k, candidates) <= self.settings.shard_max_k
        depth = max(k, candidates) if exact else k
        # the confidence cut comes after the merge: a shard that dropped hits would change the
        # candidate set the exact merge takes from the union
        min_confidence = body.get("min_confidence")
        sub = {**{key: v for key, v in body.items() if key != "min_confidence"},
               "k": min(depth, self.settings.shard_max_k)}
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self.call(s, "POST", path, json=sub) for s in range(self.n)))
        hits, timings, grid = [], [], None
        for s, r in enumerate(answers):
            if r.status_code != 200:
                raise ShardError(r.status_code, _json(r))
            doc = r.json()
            grid = grid or doc.get("grid")
            timings.append(doc.get("timings_ms", {}))
            for h in doc["hits"]:
                h["id"] = self.global_id(s, h["id"])
                h["image_id"] = self.global_id(s, h.get("image_id"))
                h["image_url"] = f"/images/{h['image_id']}" if h["image_id"] is not None else None
                hits.append(h)
        if exact:  # the single index's candidate set, then its order (see module doc)
            hits = sorted(hits, key=lambda h: -h["global_score"])[:depth]
        hits = confident(sorted(hits, key=lambda h: (-h["score"], -h["global_score"]))[:k], min_confidence)
        slowest = max(timings, key=lambda t: t.get("total", 0.0)) if timings else {}
        return {"hits": hits, "mode": body.get("mode", "rerank"), "k": k,
                "candidates": candidates if exact else depth,
                "candidates_auto": candidates == "auto", "exact": exact, "grid": grid,
                "timings_ms": {**{key: slowest.get(key, 0.0) for key in ("encode", "faiss", "rerank", "total")},
                               "request": (time.perf_counter() - t0) * 1000},
                "index": {"generation": 0, "index_dir": f"router:{self.n} shards"}}


def _json(r: httpx.Response) -> dict:
    try:
        doc = r.json()
        return doc if isinstance(doc, dict) else {"status": r.status_code, "message": str(doc)}
    except ValueError:
        return {"status": r.status_code, "message": r.text[:200]}


def create_router_app(settings: RouterSettings, client: httpx.AsyncClient | None = None) -> FastAPI:
    router = Router(settings, client)
    app = FastAPI(title="TGDT retrieval router", version="0.1.0",
                  description=f"Fans queries out to {router.n} shard services and merges their answers.")
    app.state.router = router

    @app.exception_handler(ShardError)
    async def _shard_error(_: Request, e: ShardError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    def options(model, doc: dict):
        try:
            return model.model_validate(doc)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "body"
            raise ShardError(422, {"status": 422, "message": f"{where}: {err.get('msg')}"}) from None

    @app.post("/search/text")
    async def search_text(request: Request) -> JSONResponse:
        body = await _body_json(request)
        req = options(TextSearchRequest, body)
        cands = req.candidates if req.candidates is not None else settings.default_candidates
        doc = req.model_dump(exclude_none=True) | {"candidates": cands}
        return JSONResponse(await router.search("/search/text", doc, req.k, cands))

    @app.post("/search/image")
    async def search_image(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":  # re-sent to the shards as JSON (one body, N readers)
            form = await request.form(max_files=1, max_fields=16)
            upload = form.get("file") or form.get("image")
            if upload is None or isinstance(upload, str):
                return _error(400, "multipart body has no image file: send it in a field named 'file'")
            body: dict[str, Any] = {"image_b64": base64.b64encode(await upload.read()).decode()}
            for name in ("k", "candidates", "mode", "target", "filters", "min_confidence"):
                v = form.get(name)
                if isinstance(v, str) and v.strip():
                    body[name] = json.loads(v) if name == "filters" else (
                        v if name in ("mode", "target", "min_confidence") or v == "auto" else _int(v, name))
        elif ctype == "application/json":
            body = await _body_json(request)
        else:
            return _error(415, f"unsupported content type {ctype or '(none)'}: send multipart/form-data or JSON")
        req = options(ImageSearchRequest, body)
        cands = req.candidates if req.candidates is not None else settings.default_candidates
        doc = req.model_dump(exclude_none=True) | {"candidates": cands}
        return JSONResponse(await router.search("/search/image", doc, req.k, cands))

    def global_item(doc: dict, shard: int) -> dict:
        """A shard's item record with the router's ids (and the URL that reaches its image)."""
        doc["id"] = router.global_id(shard, doc["id"])
        if doc.get("image_id") is not None:
            doc["image_id"] = router.global_id(shard, doc["image_id"])
        img = doc["id"] if doc.get("kind") == "image" else doc.get("image_id")
        doc["image_url"] = f"/images/{img}" if img is not None else None
        return doc

    @app.get("/items")
    async def find_item(request: Request) -> JSONResponse:
        """`?path=` / `?user_id=`: asked of every shard; the shard that holds the image answers."""
        params = dict(request.query_params)
        answers = await asyncio.gather(*(router.call(s, "GET", "/items", params=params) for s in range(router.n)))
        for s, r in enumerate(answers):
            if r.status_code == 200:
                return JSONResponse(global_item(_json(r), s))
        r = next((r for r in answers if r.status_code != 404), answers[0])  # a client error over "not found"
        return JSONResponse(_json(r), status_code=r.status_code)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int = PathParam(..., ge=0)) -> JSONResponse:
        shard, local = router.split_id(item_id)
        r = await router.call(shard, "GET", f"/items/{local}")
        doc = _json(r)
        return JSONResponse(global_item(doc, shard) if r.status_code == 200 else doc, status_code=r.status_code)

    @app.get("/images/{image_id}")
    async def get_image(image_id: int = PathParam(..., ge=0)) -> Response:
        shard, local = router.split_id(image_id)
        r = await router.call(shard, "GET", f"/images/{local}")
        return Response(r.content, status_code=r.status_code,
                        media_type=r.headers.get("content-type", "application/octet-stream"))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        async def ready(s: int) -> bool:
            try:
                return (await router.call(s, "GET", "/readyz")).status_code == 200
            except ShardError:
                return False
        states = await asyncio.gather(*(ready(s) for s in range(router.n)))
        down = [s for s, ok in enumerate(states) if not ok]
        ok = not down
        return JSONResponse({"ready": ok, "message": "all shards ready" if ok else f"shards not ready: {down}",
                             "shards": router.n}, status_code=200 if ok else 503)

    return app


async def _body_json(request: Request) -> dict:
    try:
        doc = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ShardError(400, {"status": 400, "message": "body is not valid JSON"}) from None
    if not isinstance(doc, dict):
        raise ShardError(422, {"status": 422, "message": "body must be a JSON object"})
    return doc


def _int(v: str, name: str) -> int:
    try:
        return int(v.strip())
    except ValueError:
        raise ShardError(422, {"status": 422, "message": f"{name} must be an integer"}) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m service.router --shard URL[,URL...] --shard ...`: serve the router with uvicorn."""
    p = argparse.ArgumentParser(prog="service-router", description=__doc__.splitlines()[0])
    p.add_argument("--shard", action="append", help="replica URLs of one shard, comma-separated (repeat per shard)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--timeout", type=float)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in {"host": a.host, "port": a.port, "timeout_s": a.timeout,
                                   "shards": ";".join(a.shard) if a.shard else None}.items() if v is not None}
    try:
        settings = RouterSettings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"service-router: invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    uvicorn.run(create_router_app(settings), host=settings.host, port=settings.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
