"""The relay's own exceptions, in one tree, so an entry point can catch the base class.

    RelayError
    ├── ConfigError            the configuration cannot be used (one line for the operator)
    │   ├── MappingError       the mapping file (names the file, line and key)
    │   └── IdentityFileError  an identity import file (names the lines)
    ├── EmbeddedRedisError     the embedded Redis could not be started or reached
    ├── RequestError(status)   an HTTP request is refused as a whole, nothing enqueued
    │   └── Unauthenticated    401: which credential check failed, and where it goes
    ├── QueueUnavailable       Redis cannot take or give work right now (retry later)
    └── DecodeError            a queued message or dead letter cannot be read

Errors of the libraries underneath (redis-py, kombu, aiohttp) are caught where they
happen and either handled there or raised again as one of these.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Base class of every exception the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration cannot be used; the message is one line for the operator."""


class MappingError(ConfigError):
    """The mapping file cannot be used; the message names the file, line and key."""


class IdentityFileError(ConfigError):
    """The file cannot be imported; the message names the lines and what is wrong."""


class EmbeddedRedisError(RelayError):
    """The embedded Redis could not be started or reached."""


class RequestError(RelayError):
    """An HTTP request refused as a whole: answered `status` with `body`, nothing enqueued."""

    def __init__(self, status: int, message: str, **body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, **body}


class Unauthenticated(RequestError):
    """A request without valid credentials (401); `check` names the check that failed
    (no_signature, signature_mismatch, no_write_key, unknown_write_key) for the log."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(401, message)
        self.check = check


class QueueUnavailable(RelayError):
    """Redis cannot take or hand out work right now; the caller may try again later."""


class DecodeError(RelayError):
    """A queued message or a dead-letter entry is not what the relay writes."""
