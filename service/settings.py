"""One typed configuration object for the service, read from a file and from the environment.

Precedence (highest first): explicit keyword arguments (the CLI flags) > environment variables
(`SERVICE_` prefix, e.g. `SERVICE_INDEX_DIR`, `SERVICE_API_KEY`, `SERVICE_CORS_ORIGINS='["*"]'`)
> a TOML or JSON file (`config_file=` or `SERVICE_CONFIG_FILE`) > the defaults below. A single
object keeps the app factory, the CLI and `uvicorn --factory` in agreement on every limit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Hard ceilings advertised in the OpenAPI schema; the settings may only tighten them.
HARD_MAX_K = 100
HARD_MAX_CANDIDATES = 10_000
HARD_MAX_QUERY_CHARS = 2_000


class ConfigFileError(ValueError):
    """The configuration file named by the user cannot be used (missing or wrong kind)."""


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="forbid", validate_default=True)

    config_file: Path | None = Field(None, description="TOML or JSON file with any of these settings")
    index_dir: Path | None = Field(None, description="index directory built by `indexer build`")
    checkpoint: Path | None = Field(None, description="override the checkpoint the index manifest names")
    device: str | None = Field(None, description="torch device; default: CUDA when present, else CPU")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    api_key: SecretStr | None = Field(None, description="when set, every search/item/image/admin call needs it, "
                                      "sent as the X-API-Key header or Authorization: Bearer (never in the URL), "
                                      "and so do /metrics, /openapi.json and /readyz's details")
    admin_key: SecretStr | None = Field(None, description="key for /admin/*; defaults to api_key")
    public_ops: bool = Field(False, description="with an api_key set, still serve /metrics, /docs, "
                             "/openapi.json and /readyz's details without it (e.g. a scraper on a private network)")
    allow_admin: bool = Field(True, description="expose POST /admin/reload (index hot swap)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="allowed CORS origins; ['*'] for any")

    max_request_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="413 above this body size")
    max_query_chars: int = Field(512, ge=1, le=HARD_MAX_QUERY_CHARS)
    max_k: int = Field(HARD_MAX_K, ge=1, le=HARD_MAX_K)
    default_candidates: int = Field(100, ge=1, le=HARD_MAX_CANDIDATES)
    max_candidates: int = Field(1000, ge=1, le=HARD_MAX_CANDIDATES)
    rerank_budget_ms: float = Field(20.0, gt=0, description="latency budget of the re-rank for candidates='auto'")
    auto_min_candidates: int = Field(10, ge=1, description="floor of the auto depth (never below k either)")

    search_threads: int = Field(8, ge=1, le=64, description="bounded executor running encoders + FAISS; "
                                "requests waiting in it share one text-encoder pass (encode_batch)")
    faiss_threads: int | None = Field(None, ge=1, description="OpenMP threads for FAISS (1 is best for single queries)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for torch (and the ONNX text encoder)")
    text_runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx", description="what encodes text queries on CPU: onnx (ONNX Runtime, same embeddings as torch, "
        "~2x faster), onnx-int8 (int8 weights, faster again, slightly different embeddings: see "
        "BENCHMARKS.md), torch; CUDA always uses torch")
    encode_batch: int = Field(16, ge=1, le=256, description="concurrent text queries encoded in one pass "
                              "(1: never coalesce)")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port; each loads the index "
                         "(the token store's pages are shared), so Python's per-request work runs on every core "
                         "(see service.workers); SIGHUP and /admin/reload reach them all")
    verify: Literal["background", "full", "off"] = Field(
        "background", description="checksums of the index files: background (all but the token segments before "
        "the first load, those after it while /readyz says verified: pending; a swap checks every file before "
        "it), full (every file before every load), off (none)")
    background_load: bool = Field(True, description="load the index after startup; /readyz says when done")
    keep_alive_s: float = Field(75.0, gt=0, description="idle keep-alive; above a load balancer's idle timeout "
                                "(60 s typical) so a reused connection is never closed under a client's request")
    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        # Accept "a,b" as well as a JSON list, since people type both into env files.
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _check_bounds(self) -> "ServiceSettings":
        if self.default_candidates > self.max_candidates:
            raise ValueError(f"default_candidates ({self.default_candidates}) exceeds max_candidates "
                             f"({self.max_candidates})")
        return self

    @property
    def effective_admin_key(self) -> SecretStr | None:
        return self.admin_key or self.api_key

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {}) or {}
        path = init_kwargs.get("config_file") or os.environ.get("SERVICE_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise ConfigFileError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ConfigFileError(f"config file must be .toml or .json: {path}")
