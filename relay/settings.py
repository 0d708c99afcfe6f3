"""The relay's configuration: one pydantic-settings object, read from `RELAY_*`.

Build it once at each entry point (`Settings()`), pass it down, and in tests build it
with keywords. A bad value fails at start with one line naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class Settings(BaseSettings):
    """Everything the ingest service, the workers and the CLI read from the environment."""

    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore", frozen=True)

    redis_url: str | None = None
    # Sentinel: the monitored primary's name, with a sentinel://h:p;sentinel://h:p/db URL.
    redis_master: str | None = None
    # TLS (rediss:// URLs): the CA that signed the server's certificate (else the
    # system's), and a client certificate and key when the server asks for one.
    redis_tls_ca_file: FilePath | None = None
    redis_tls_cert_file: FilePath | None = None
    redis_tls_key_file: FilePath | None = None
    # Answer 200 only once WAIT confirms this many replicas hold the events (0: don't wait).
    redis_wait_replicas: int = Field(0, ge=0)
    redis_wait_timeout_ms: int = Field(1000, ge=1)
    state_dir: Path = Path(".relay")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    webhook_secret: SecretStr | None = None
    write_keys: Annotated[tuple[str, ...], NoDecode] = ()
    allow_unauthenticated: bool = False
    churnzero_url: str = "https://analytics.churnzero.net/i"
    churnzero_app_key: SecretStr | None = None
    churnzero_batch_size: int = Field(100, ge=1, le=1000)
    churnzero_timeout_s: float = Field(10.0, gt=0)
    admin_token: SecretStr | None = None
    mapping_file: Path | None = None
    sandbox_port: int = Field(8090, ge=0, le=65535)
    max_queue_depth: int = Field(1_000_000, ge=1)

    # Group commit at ingest: a Celery message is published every `flush_ms` or
    # every `message_events` events, whichever comes first.
    flush_ms: float = Field(2.0, ge=0)
    message_events: int = Field(500, ge=1, le=10_000)

    worker_concurrency: int = Field(4, ge=1)
    rate_limit_rps: float = Field(0.0, ge=0)  # requests/s to ChurnZero, all workers; 0 = none
    max_age_s: float = Field(4 * 3600, gt=0)
    identity_wait_s: float = Field(600, ge=0)
    identity_ttl_s: int = Field(365 * 24 * 3600, ge=60)  # forget users not identified since
    dedupe_window_s: int = Field(24 * 3600, ge=0)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_cap_s: float = Field(300.0, gt=0)
    # Consecutive failed requests after which every worker pauses (circuit open).
    outage_threshold: int = Field(5, ge=1)
    task_time_limit_s: int = Field(300, ge=5)
    visibility_timeout_s: int = Field(1800, ge=10)

    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console

    @field_validator("write_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator("churnzero_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("must be auto, json or console")
        return value

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        url = self.redis_url or ""
        sentinel = url.startswith("sentinel://")
        if sentinel:
            from relay.redis_conn import parse_sentinel  # late: it imports this module

            try:
                parse_sentinel(url)  # a malformed URL fails here, at start
            except ValueError as exc:
                raise ValueError(f"RELAY_REDIS_URL: {exc}") from exc
        if sentinel and not self.redis_master:
            raise ValueError("a sentinel:// RELAY_REDIS_URL needs RELAY_REDIS_MASTER")
        if self.redis_master and not sentinel:
            raise ValueError("RELAY_REDIS_MASTER needs a sentinel://host:port;... RELAY_REDIS_URL")
        tls = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(f is not None for f in tls) and not url.startswith("rediss://"):
            raise ValueError("RELAY_REDIS_TLS_* files need a rediss:// RELAY_REDIS_URL")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("RELAY_REDIS_TLS_CERT_FILE and RELAY_REDIS_TLS_KEY_FILE go together")
        return self

    @model_validator(mode="after")
    def _visibility_above_time_limit(self) -> Settings:
        # A message not acked within the visibility timeout is delivered again; it must
        # outlast the longest a task may run, or slow tasks run twice.
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("visibility_timeout_s must be above task_time_limit_s")
        return self

    @property
    def authenticated(self) -> bool:
        """Whether any ingest credential (webhook secret or write key) is configured."""
        return self.webhook_secret is not None or bool(self.write_keys)

    @property
    def uses_sandbox(self) -> bool:
        """No ChurnZero app key: `relay dev` delivers to the local sandbox."""
        return self.churnzero_app_key is None

    def require_ingest_auth(self) -> None:
        """Refuse to run ingest open to anyone unless explicitly told to."""
        if not self.authenticated and not self.allow_unauthenticated:
            raise ConfigError(
                "refusing to start: set RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS "
                "(or RELAY_ALLOW_UNAUTHENTICATED=true for development)"
            )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, or a ConfigError with one readable line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]  # keywords are field names
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if not field:  # a check across fields: its message names the variables
            raise ConfigError(f"bad configuration: {first['msg']}") from exc
        raise ConfigError(f"bad configuration: RELAY_{field.upper()}: {first['msg']}") from exc
