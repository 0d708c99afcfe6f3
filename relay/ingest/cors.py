"""CORS for the tracking API, so analytics.js in a browser can post to the relay.

Recent analytics-next versions send an `Authorization` header, which makes every
request "non-simple": the browser first sends an `OPTIONS` preflight and only posts
when the answer allows the page's origin, method and headers. Write keys are public
by design (they sit in every page's source), so the default allows every origin;
`RELAY_CORS_ORIGINS` narrows it.
"""

from __future__ import annotations

from collections.abc import Collection

ALLOWED_METHODS = "POST, OPTIONS"
DEFAULT_HEADERS = "Content-Type, Authorization, Content-Encoding"
MAX_AGE_S = 7200  # Chromium's cap: a preflight per page load is plenty


def allowed(origin: str | None, origins: Collection[str]) -> bool:
    """Whether a page on `origin` may call the tracking API."""
    return origin is not None and ("*" in origins or origin in origins)


def response_headers(origin: str | None, origins: Collection[str]) -> dict[str, str]:
    """Headers for an actual request's answer (empty: not a permitted cross-origin call)."""
    if not allowed(origin, origins):
        return {}
    # The origin is echoed rather than `*`, which stays valid if a client sends credentials.
    return {"Access-Control-Allow-Origin": str(origin), "Vary": "Origin"}


def preflight_headers(
    origin: str | None, origins: Collection[str], requested_headers: str | None
) -> dict[str, str]:
    """Headers for an OPTIONS preflight's answer (empty: the origin is not allowed)."""
    out = response_headers(origin, origins)
    if out:
        out.update({
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": (requested_headers or "").strip() or DEFAULT_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
        })  # fmt: skip
        out["Vary"] = "Origin, Access-Control-Request-Headers"
    return out
