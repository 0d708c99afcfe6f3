"""relay.ingest.auth: Segment's webhook signature, write keys in Basic auth, admin bearer tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from relay.ingest.auth import (
    basic_username,
    bearer_token,
    first_element,
    known_key,
    signature,
    valid_signature,
)

SECRET = "whsec-shared-secret"


# --- signature of a single body ---------------------------------------------------------


def test_signature_is_hex_hmac_sha1() -> None:
    # The RFC 2104 / Wikipedia HMAC-SHA1 test vector.
    digest = signature("key", b"The quick brown fox jumps over the lazy dog")
    assert digest == "de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9"


SINGLE = b'{"type":"track","userId":"u1","event":"Signed Up","properties":{"plan":"pro"}}'


def test_single_event_signed_over_the_whole_body_is_accepted() -> None:
    header = hmac.new(SECRET.encode(), SINGLE, hashlib.sha1).hexdigest()
    assert valid_signature(SECRET, SINGLE, header)


def test_single_event_with_a_changed_byte_is_rejected() -> None:
    header = signature(SECRET, SINGLE)
    assert not valid_signature(SECRET, SINGLE.replace(b"pro", b"pro "), header)


def test_signature_with_another_secret_is_rejected() -> None:
    assert not valid_signature(SECRET, SINGLE, signature("another-secret", SINGLE))


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_signature_is_rejected(header: str | None) -> None:
    assert not valid_signature(SECRET, SINGLE, header)


def test_signature_header_tolerates_surrounding_space_and_upper_case_hex() -> None:
    header = " " + signature(SECRET, SINGLE).upper() + "\n"
    assert valid_signature(SECRET, SINGLE, header)


def test_truncated_signature_is_rejected() -> None:
    assert not valid_signature(SECRET, SINGLE, signature(SECRET, SINGLE)[:-1])


# --- batched webhooks: signed over the first element's exact bytes ----------------------

# Written by hand so that no serializer would reproduce it: odd whitespace, raw UTF-8,
# \u escapes, quotes, backslashes and brackets inside strings, 1.10 and 1e3, nested arrays.
FIRST = (
    b'{ "type" :"track" ,\n\t"userId":"u\xc3\xa9-1",  "event" : "Caf\\u00e9 \\"Open\\" ]}",\r\n'
    b'  "properties": {"path": "C:\\\\dir\\\\", "price": 1.10, "n": 1e3, "neg": -0.0,'
    b' "emoji": "\xf0\x9f\x98\x80 \\ud83d\\ude00",'
    b' "grid": [[1, [2, 3]], [], [[ ]], ["[", "]", "{", "}", ","]],'
    b' "empty": {}, "nil": null, "ok": true}\n}'
)
SECOND = b'{"type":"identify","userId":"u2","traits":{"name":"Zo\xc3\xab"}}'
BATCH = b"  \r\n[\n\t " + FIRST + b"  ,\n  " + SECOND + b"\n]\n"


def test_hand_written_batch_is_valid_json() -> None:
    # Guard for the fixture above: it is what Segment could send.
    first, second = json.loads(BATCH)
    assert first["event"] == 'Café "Open" ]}'
    assert first["properties"]["path"] == "C:\\dir\\"
    assert second["traits"]["name"] == "Zoë"


def test_first_element_is_the_exact_bytes_sent() -> None:
    assert first_element(BATCH) == FIRST


def test_batch_signed_over_the_first_element_is_accepted() -> None:
    assert valid_signature(SECRET, BATCH, signature(SECRET, FIRST))


def test_batch_signed_over_the_second_element_is_rejected() -> None:
    assert not valid_signature(SECRET, BATCH, signature(SECRET, SECOND))


def test_batch_signed_over_the_reserialised_first_element_is_rejected() -> None:
    reserialised = json.dumps(json.loads(FIRST)).encode()
    assert reserialised != FIRST
    assert not valid_signature(SECRET, BATCH, signature(SECRET, reserialised))
    compact = json.dumps(json.loads(FIRST), separators=(",", ":"), ensure_ascii=False).encode()
    assert not valid_signature(SECRET, BATCH, signature(SECRET, compact))


def test_batch_with_a_wrong_signature_is_rejected() -> None:
    assert not valid_signature(SECRET, BATCH, signature("another-secret", FIRST))
    assert not valid_signature(SECRET, BATCH, None)


def test_batch_whose_first_element_was_altered_is_rejected() -> None:
    header = signature(SECRET, FIRST)
    tampered = BATCH.replace(b"1.10", b"1.1")
    assert not valid_signature(SECRET, tampered, header)


@pytest.mark.parametrize(
    ("body", "element"),
    [
        pytest.param(b'[{"a":1}]', b'{"a":1}', id="one-object"),
        pytest.param(b'[{"a":1},{"b":2}]', b'{"a":1}', id="two-objects"),
        pytest.param(b'[ {"a":"]"} , {"b":2}]', b'{"a":"]"}', id="bracket-in-string"),
        pytest.param(b'[{"a":"\\\\"},{"b":2}]', b'{"a":"\\\\"}', id="escaped-backslash-at-end"),
        pytest.param(b'[{"a":"\\"}"},1]', b'{"a":"\\"}"}', id="escaped-quote-then-brace"),
        pytest.param(b"[[1,[2,3]] , 4]", b"[1,[2,3]]", id="nested-array"),
        pytest.param(b"[ 1.10 , 2]", b"1.10", id="number"),
        pytest.param(b"[1e3]", b"1e3", id="lone-exponent"),
        pytest.param(b'["a,]b", 1]', b'"a,]b"', id="string"),
        pytest.param(b"[ null ]", b"null", id="null"),
    ],
)
def test_first_element_of_various_arrays(body: bytes, element: bytes) -> None:
    assert first_element(body) == element


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"batch": [1, 2]}', id="object"),
        pytest.param(b'"[1]"', id="string"),
        pytest.param(b"", id="empty"),
        pytest.param(b'[{"a": 1', id="unterminated"),
        pytest.param(b'[{"a": "]', id="unterminated-string"),
    ],
)
def test_first_element_of_a_body_that_is_not_a_complete_array(body: bytes) -> None:
    assert first_element(body) is None


# --- write key as the Basic username ----------------------------------------------------


def basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


@pytest.mark.parametrize(
    ("header", "username"),
    [
        pytest.param(basic(b"wk_123:secret"), "wk_123", id="user-and-password"),
        pytest.param(basic(b"wk_123:"), "wk_123", id="empty-password"),
        pytest.param(basic(b"wk_123"), "wk_123", id="no-colon"),
        pytest.param(basic(b"wk_123:pa:ss"), "wk_123", id="colon-in-password"),
        pytest.param("basic " + basic(b"wk_123:")[6:], "wk_123", id="lower-case-scheme"),
        pytest.param("BASIC  " + basic(b"wk_123:")[6:] + " ", "wk_123", id="extra-space"),
        pytest.param(basic("clé:".encode()), "clé", id="utf8-username"),
        pytest.param(basic(b":password"), None, id="empty-username"),
        pytest.param(basic(b""), None, id="empty-credentials"),
        pytest.param("Basic !!!not-base64!!!", None, id="garbage-base64"),
        pytest.param("Basic d2tfMTIzOg", None, id="unpadded-base64"),
        pytest.param(basic(b"\xff\xfe:"), None, id="not-utf8"),
        pytest.param("Bearer d2tfMTIzOg==", None, id="bearer-scheme"),
        pytest.param("Digest username=wk_123", None, id="digest-scheme"),
        pytest.param("d2tfMTIzOg==", None, id="no-scheme"),
        pytest.param("Basic", None, id="scheme-only"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="missing"),
    ],
)
def test_basic_username(header: str | None, username: str | None) -> None:
    assert basic_username(header) == username


# --- configured write keys --------------------------------------------------------------

KEYS = ("wk_live_1", "wk_live_2")


@pytest.mark.parametrize(
    ("candidate", "known"),
    [
        ("wk_live_1", True),
        ("wk_live_2", True),
        ("wk_live_3", False),
        ("wk_live", False),
        ("wk_live_1 ", False),
        ("WK_LIVE_1", False),
        ("", False),
        (None, False),
        ("wk_live_é", False),
    ],
)
def test_known_key(candidate: str | None, known: bool) -> None:
    assert known_key(candidate, KEYS) is known


def test_no_configured_keys_knows_nothing() -> None:
    assert not known_key("wk_live_1", ())


# --- admin bearer token -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cr3t-token", "s3cr3t-token"),
        ("bearer s3cr3t-token", "s3cr3t-token"),
        ("BEARER   s3cr3t-token  ", "s3cr3t-token"),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Bearers3cr3t", None),
        ("Basic s3cr3t-token", None),
        ("s3cr3t-token", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
