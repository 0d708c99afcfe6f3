"""Ingest credentials: Segment's webhook signature and tracking-API write keys.

Comparisons are constant-time; nothing here logs or returns a secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac

_WHITESPACE = b" \t\r\n"


def signature(secret: str, payload: bytes) -> str:
    """Segment's `X-Signature`: hex HMAC-SHA1 of the payload with the shared secret."""
    mac = _keyed(secret).copy()  # the key's state copied, not set up again per request
    mac.update(payload)
    return mac.hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed(secret: str) -> hmac.HMAC:
    return hmac.new(secret.encode(), digestmod=hashlib.sha1)


def first_element(body: bytes) -> bytes | None:
    """The exact bytes of the first element of a JSON array body, or None if not an array.

    Segment signs a batched webhook by its first element, so we need that element's
    bytes as sent, not a re-serialisation.
    """
    i = _skip(body, 0)
    if i >= len(body) or body[i : i + 1] != b"[":
        return None
    start = _skip(body, i + 1)
    depth = 0
    in_string = False
    escaped = False
    for j in range(start, len(body)):
        ch = body[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_string = False
            continue
        if ch == 0x22:
            in_string = True
        elif ch in b"{[":
            depth += 1
        elif ch in b"}]":
            if depth == 0:  # the array closed: the element was a scalar (or absent)
                return body[start:j].rstrip(_WHITESPACE) or None
            depth -= 1
            if depth == 0:
                return body[start : j + 1]
        elif ch == 0x2C and depth == 0:  # comma after a scalar element
            return body[start:j].rstrip(_WHITESPACE)
    return None


def _skip(body: bytes, i: int) -> int:
    while i < len(body) and body[i] in _WHITESPACE:
        i += 1
    return i


def valid_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` signs this webhook body (or, for an array, its first element)."""
    if not header:
        return False
    given = header.strip().lower().removeprefix("sha1=")
    candidates = [body]
    element = first_element(body)
    if element is not None:
        candidates.insert(0, element)
    # Compare against every candidate so timing does not depend on which one matched.
    results = [hmac.compare_digest(signature(secret, c), given) for c in candidates]
    return any(results)


def basic_username(header: str | None) -> str | None:
    """The username of an HTTP Basic `Authorization` header (Segment puts the write key there)."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0] or None


def known_key(candidate: str | None, keys: tuple[str, ...]) -> bool:
    """Whether `candidate` is one of the configured write keys (constant-time per key)."""
    if not candidate:
        return False
    matches = [hmac.compare_digest(candidate.encode(), key.encode()) for key in keys]
    return any(matches)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header."""
    if not header or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None
