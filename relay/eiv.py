"""ChurnZero's Enhanced Identity Verification (EIV): pure functions, no I/O.

A tenant with EIV on discards every command that does not carry `accountExternalIdHash`
and `contactExternalIdHash` (support.churnzero.com, article 360002985491, "Enhanced
Identity Verification Configuration"): HMACs of the two ids with the secret token an
administrator entered under Admin > General Settings. The article names HMACs but not
the digest; clients in the wild compute hex HMAC-SHA256(secret, id) over UTF-8 bytes,
which is what this does.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

ACCOUNT_HASH = "accountExternalIdHash"
CONTACT_HASH = "contactExternalIdHash"


def id_hash(secret: str, external_id: str) -> str:
    """Hex HMAC-SHA256 of an external id with the tenant's EIV secret."""
    return hmac.new(secret.encode(), external_id.encode(), hashlib.sha256).hexdigest()


def signed(command: dict[str, Any], secret: str) -> dict[str, Any]:
    """The command with both EIV hashes added."""
    return {
        **command,
        ACCOUNT_HASH: id_hash(secret, str(command.get("accountExternalId", ""))),
        CONTACT_HASH: id_hash(secret, str(command.get("contactExternalId", ""))),
    }


def verified(command: dict[str, Any], secret: str) -> bool:
    """Whether a command carries the right hashes for its ids (constant-time)."""
    expected = signed(command, secret)
    return all(
        isinstance(command.get(key), str) and hmac.compare_digest(command[key], expected[key])
        for key in (ACCOUNT_HASH, CONTACT_HASH)
    )
