"""The relay's configuration: one pydantic-settings object, read from `RELAY_*`.

Build it once at each entry point (`Settings()`), pass it down, and in tests build it
with keywords. A bad value fails at start with one line naming the variable.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from relay.errors import ConfigError

# Between a task's time limit and the visibility timeout: the watchdog's grace and the
# settlement writes after the last send.
VISIBILITY_MARGIN_S = 15
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# How `relay worker` (relay.ops.supervise) tells its Celery workers that the replay lane
# runs on demand: the live worker finds the supervisor's pid in LANE_DEMAND_VAR (to ask
# for the lane while replays wait), the lane's worker finds LANE_ON_DEMAND_VAR set (to
# stop once idle). Not settings: nothing an operator sets.
LANE_DEMAND_VAR = "_RELAY_LANE_DEMAND_PID"
LANE_ON_DEMAND_VAR = "_RELAY_LANE_ON_DEMAND"


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
    # Origins whose pages may call /v1/* from a browser (CORS); "*" = any.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ("*",)
    churnzero_url: str = "https://analytics.churnzero.net/i"
    churnzero_app_key: SecretStr | None = None
    # Plain http to a non-loopback ChurnZero URL sends the app key in clear: opt-in only.
    churnzero_allow_http: bool = False
    # Enhanced Identity Verification: every command carries HMAC-SHA256 hashes of its ids.
    churnzero_eiv_secret: SecretStr | None = None
    # How long every worker holds back after a redirect or a 200 that is not ChurnZero's
    # pixel: a configuration error, which retrying at once would not fix.
    churnzero_misconfigured_pause_s: float = Field(60.0, gt=0)
    churnzero_batch_size: int = Field(100, ge=1, le=1000)
    churnzero_timeout_s: float = Field(10.0, gt=0)
    admin_token: SecretStr | None = None
    mapping_file: Path | None = None
    sandbox_port: int = Field(8090, ge=0, le=65535)
    max_queue_depth: int = Field(1_000_000, ge=1)
    # Ingest answers 503 once Redis's used_memory passes this fraction of maxmemory, so
    # Redis never fills up from ingest and workers keep room to drain it.
    max_memory_fraction: float = Field(0.9, gt=0, le=1)

    # Group commit at ingest: a Celery message is published every `flush_ms` or
    # every `message_events` events, whichever comes first.
    flush_ms: float = Field(2.0, ge=0)
    message_events: int = Field(500, ge=1, le=10_000)

    worker_concurrency: int = Field(4, ge=1)
    # `relay worker`'s replay-lane process runs this much nicer than the live one, so a
    # host busy with both gives live work the CPU first (0: the same priority).
    replay_nice: int = Field(10, ge=0, le=19)
    # ... and, on Linux, under the SCHED_IDLE policy: it gets only the CPU time no other
    # process of the host wants, so live latency does not feel a replay.
    replay_sched_idle: bool = True
    # `relay worker` starts its replay-lane process when replays are queued, and the lane
    # stops after this long with nothing to do: its memory is spent only while it works.
    replay_idle_s: float = Field(60.0, gt=0)
    rate_limit_rps: float = Field(0.0, ge=0)  # requests/s to ChurnZero, all workers; 0 = none
    # Learn ChurnZero's unpublished limit from its 429s (AIMD), under rate_limit_rps if set.
    adaptive_rate: bool = True
    # The share of the rate replays get while live events flow (all of it otherwise).
    replay_share: float = Field(0.2, gt=0, le=1)
    max_age_s: float = Field(4 * 3600, gt=0)
    identity_wait_s: float = Field(600, ge=0)
    identity_ttl_s: int = Field(365 * 24 * 3600, ge=60)  # forget users not identified since
    dedupe_window_s: int = Field(24 * 3600, ge=0)
    # How long the event time of each attribute's last value is kept (out-of-order
    # protection reaches back this far); 0 turns the protection off.
    attribute_clock_ttl_s: int = Field(30 * 24 * 3600, ge=0)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_cap_s: float = Field(300.0, gt=0)
    # The longest a ChurnZero Retry-After may hold the relay back (it can say a day).
    retry_after_cap_s: float = Field(300.0, gt=0)
    # Consecutive failed requests after which every worker pauses (circuit open).
    outage_threshold: int = Field(5, ge=1)
    # The longest one task may run: its sends stop before it (what is unsent is deferred),
    # and a worker whose task overruns it by far exits so its messages come back.
    task_time_limit_s: int = Field(40, ge=5)
    # Messages of a dead worker come back after this long; above the task time limit, so
    # a message is never handed out again while its task still runs.
    visibility_timeout_s: int = Field(60, ge=10)
    # A worker's hold on the messages it took outlives its last heartbeat (every quarter
    # of it) by this long: a dead worker's messages go to the others after about this
    # long, and a worker cut off from Redis for longer is taken for dead.
    worker_lease_s: float = Field(8.0, ge=2, le=60)
    # How long a message's run record (settled mark, events already delivered) is kept:
    # a redelivery of the message within it is recognised and not sent again.
    run_record_ttl_s: int = Field(3600, ge=60)

    # New ChurnZero names (event types, fields): "count" them, or "hold" (dead-letter the
    # event as new_name until `relay names allow`). At most names_max remembered per kind.
    new_names: str = "count"
    names_max: int = Field(10_000, ge=1)

    # Events the record of recent settlements keeps for `relay trace` (0: none). Its Redis
    # memory grows with it (per-event figures in docs/operations.md).
    trace_size: int = Field(100_000, ge=0)
    # The flight recorder (relay.archive): on unless `archive` is false; files under
    # `archive_url` (s3://bucket/prefix) if set, else `archive_dir`, else <state_dir>/archive.
    archive: bool = True
    archive_dir: Path | None = None
    archive_url: str | None = None
    archive_days: int = Field(30, ge=1)
    # How long the archiver gathers records before it writes a file (fewer, larger files
    # against a shorter lag).
    archive_flush_s: float = Field(5.0, gt=0)
    # Whether `relay worker` runs an archiver as its child (false: `relay archive` runs
    # as a service of its own).
    worker_archiver: bool = True

    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    # Ingest's request lines: `each` request in full, or an `aggregate` line a second for
    # the good ones (every error, non-2xx and rejected event is still logged in full).
    ingest_log: Literal["aggregate", "each"] = "aggregate"
    # `relay serve` runs this many ingest processes on its port; 0 = one per core.
    ingest_processes: int = Field(0, ge=0)
    # libuv's event loop for ingest (uvloop), less CPU per request; false = asyncio's own.
    ingest_uvloop: bool = True

    @field_validator("write_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator(
        "churnzero_app_key", "churnzero_eiv_secret", "webhook_secret", "admin_token",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `RELAY_CHURNZERO_APP_KEY=` would otherwise send appKey "" to ChurnZero, and an
        # empty webhook secret or admin token is one anybody knows (compose's `${VAR:-}`).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        # redis-py would read `localhost:6379` as a unix socket path and fail at first use.
        if value is not None and not value.startswith(REDIS_SCHEMES):
            raise ValueError(
                f"{value!r} is not a Redis URL: write redis://host:6379/0 "
                "(or rediss://, unix:///path.sock, sentinel://host:26379)"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A browser sends its origin as scheme://host[:port]; anything else never matches.
        for origin in value:
            parts = urlsplit(origin)
            is_origin = parts.scheme in ("http", "https") and parts.netloc and not parts.path
            if origin != "*" and not is_origin:
                raise ValueError(
                    f"{origin!r} is not an origin: write https://example.com "
                    "(scheme, host, optional port) or *"
                )
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("churnzero_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("archive_url")
    @classmethod
    def _archive_url(cls, value: str | None) -> str | None:
        if value and not value.startswith("s3://"):
            raise ValueError(
                "must name an S3-compatible bucket: s3://bucket/prefix (with "
                "?endpoint_override=host:port&scheme=http for a server other than AWS)"
            )
        return value or None

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("must be auto, json or console")
        return value

    @field_validator("new_names")
    @classmethod
    def _new_names(cls, value: str) -> str:
        if value not in ("count", "hold"):
            raise ValueError("must be count or hold")
        return value

    @model_validator(mode="after")
    def _https_unless_loopback(self) -> Settings:
        # The app key travels in every request body; only loopback (the sandbox) or an
        # explicit opt-in may use plain http.
        if (
            self.churnzero_url.startswith("http://")
            and not self.churnzero_is_loopback
            and not self.churnzero_allow_http
        ):
            raise ValueError(
                "RELAY_CHURNZERO_URL must be https:// unless it is loopback "
                "(or set RELAY_CHURNZERO_ALLOW_HTTP=true)"
            )
        return self

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        url = self.redis_url or ""
        sentinel = url.startswith("sentinel://")
        if sentinel:
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
        if self.visibility_timeout_s < self.task_time_limit_s + VISIBILITY_MARGIN_S:
            raise ValueError(
                f"visibility_timeout_s must be at least task_time_limit_s + {VISIBILITY_MARGIN_S}"
            )
        return self

    @property
    def authenticated(self) -> bool:
        """Whether any ingest credential (webhook secret or write key) is configured."""
        return self.webhook_secret is not None or bool(self.write_keys)

    @property
    def churnzero_is_loopback(self) -> bool:
        """Whether the ChurnZero URL points at this machine (the sandbox)."""
        host = urlsplit(self.churnzero_url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def require_app_key(self) -> None:
        """Refuse to deliver to a real ChurnZero without an app key."""
        if self.churnzero_app_key is None and not self.churnzero_is_loopback:
            raise ConfigError(
                "refusing to start: set RELAY_CHURNZERO_APP_KEY (ChurnZero drops commands "
                "without it), or point RELAY_CHURNZERO_URL at the sandbox on loopback"
            )

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
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in first["loc"])
        if not field:  # a rule across settings names its variables itself
            raise ConfigError(f"bad configuration: {message}") from exc
        raise ConfigError(f"bad configuration: RELAY_{field.upper()}: {message}") from exc


SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a `sentinel://h:p;sentinel://h:p/db` URL."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel(url: str) -> SentinelURL:
    """The sentinels, database and credentials of a Sentinel URL; ValueError if malformed."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    username = password = None
    for part in url.split(";"):
        split = urlsplit(part.strip())
        if split.scheme != "sentinel" or not split.hostname:
            raise ValueError(f"{part!r} is not sentinel://host:port")
        sentinels.append((split.hostname, split.port or SENTINEL_PORT))
        if split.path.strip("/"):
            if not split.path.strip("/").isdigit():
                raise ValueError(f"database {split.path!r} is not a number")
            dbs.add(int(split.path.strip("/")))
        username = username or (unquote(split.username) if split.username else None)
        password = password or (unquote(split.password) if split.password else None)
    if len(dbs) > 1:
        raise ValueError("the sentinels name different databases")
    return SentinelURL(tuple(sentinels), dbs.pop() if dbs else 0, username, password)
