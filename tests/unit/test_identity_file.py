"""relay.ops.identity_file: the files `relay identities import` reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import IdentityFileError
from relay.ops.identity_file import read
from relay.resolution import Known


def test_csv_with_either_id_and_optional_contact(tmp_path: Path) -> None:
    file = tmp_path / "users.csv"
    file.write_text(
        "userId,anonymousId,accountExternalID,contactExternalId\n"
        "u1,,A1,c1@x.io\n"
        ",anon-2,A2,\n"
        "u3,anon-3,A3,c3\n"
    )
    assert read(file) == {
        "u:u1": Known("A1", "c1@x.io"),
        "a:anon-2": Known("A2", None),
        "u:u3": Known("A3", "c3"),
        "a:anon-3": Known("A3", "c3"),
    }


def test_json_lines_without_a_known_suffix(tmp_path: Path) -> None:
    file = tmp_path / "export.txt"
    file.write_text('{"userId": 42, "accountExternalId": "A"}\n\n{"anonymousId": "b", '
                    '"accountExternalId": 7, "contactExternalId": "c"}\n')  # fmt: skip
    assert read(file) == {"u:42": Known("A"), "a:b": Known("7", "c")}


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("a.csv", "userId,contactExternalId\nu1,c1\n", "line 2: accountExternalId is required"),
        ("a.csv", "accountExternalId\nA\n", "line 2: userId or anonymousId is required"),
        ("a.jsonl", '{"userId": "u", "accountExternalId": "' + "x" * 101 + '"}\n',
         "line 1: accountExternalId is longer than 100 characters"),
        ("a.jsonl", '{"userId": true, "accountExternalId": "A"}\n', "line 1: userId is not an id"),
        ("a.jsonl", '["u", "A"]\n', "line 1: not an object"),
        ("a.jsonl", "{oops\n", "line 1: not JSON"),
        ("a.csv", "userId,accountExternalId\n", "no identities in the file"),
    ],
)  # fmt: skip
def test_bad_files_name_the_line(tmp_path: Path, name: str, text: str, problem: str) -> None:
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(IdentityFileError, match=problem):
        read(file)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError, match="cannot read"):
        read(tmp_path / "nope.csv")
