"""relay.mapping: the TOML mapping file, and the precise errors a bad one gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import MappingError
from relay.mapping import Mapping, TraitMap, load_mapping

FULL = """\
[identity]
account_paths = ["traits.company.id"]
contact_paths = ["traits.email", "context.traits.email"]

[traits]
rename = { plan = "Plan Name" }
account = ["plan", "mrr"]
ignore = ["password"]

[events]
rename = { "Clicked Login Button" = "Login" }
allow = []
deny = ["Heartbeat"]

[events.fields]
"Order Completed" = ["revenue"]
"*" = ["plan"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_means_the_default_mapping() -> None:
    mapping = load_mapping(None)
    assert mapping == Mapping()
    assert mapping.attribute_name("firstName") == "FirstName"
    assert mapping.attribute_name("first_name") == "FirstName"
    assert mapping.attribute_name("last_name") == "LastName"
    assert mapping.attribute_name("email") == "Email"
    assert mapping.attribute_name("plan") == "plan"
    assert mapping.event_wanted("Anything")
    assert mapping.custom_fields("Order Completed") == ()


def test_valid_file_is_applied(tmp_path: Path) -> None:
    mapping = load_mapping(write(tmp_path, FULL))

    assert mapping.identity.account_paths == ("traits.company.id",)
    assert mapping.identity.contact_paths == ("traits.email", "context.traits.email")
    assert mapping.attribute_name("plan") == "Plan Name"
    assert mapping.attribute_name("firstName") == "FirstName"  # defaults still apply
    assert mapping.traits.account == {"plan", "mrr"}
    assert mapping.traits.ignore == {"password"}
    assert mapping.event_name("Clicked Login Button") == "Login"
    assert mapping.event_name("Signed Up") == "Signed Up"
    assert not mapping.event_wanted("Heartbeat")
    assert mapping.event_wanted("Signed Up")
    assert mapping.custom_fields("Order Completed") == ("revenue", "plan")
    assert mapping.custom_fields("Signed Up") == ("plan",)


def test_file_rename_overrides_a_default_rename(tmp_path: Path) -> None:
    mapping = load_mapping(write(tmp_path, '[traits]\nrename = { email = "Work Email" }\n'))
    assert mapping.attribute_name("email") == "Work Email"


def test_allow_list_lets_only_its_events_through(tmp_path: Path) -> None:
    mapping = load_mapping(write(tmp_path, '[events]\nallow = ["Signed Up"]\n'))
    assert mapping.event_wanted("Signed Up")
    assert not mapping.event_wanted("Clicked Login Button")


def test_deny_wins_over_allow(tmp_path: Path) -> None:
    text = '[events]\nallow = ["Heartbeat"]\ndeny = ["Heartbeat"]\n'
    assert not load_mapping(write(tmp_path, text)).event_wanted("Heartbeat")


def test_empty_file_is_the_default_mapping(tmp_path: Path) -> None:
    assert load_mapping(write(tmp_path, "# nothing to change\n")) == Mapping()


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        pytest.param(
            '[traits]\nrename = { plan = "Plan" }\nrenmae = { mrr = "MRR" }\n',
            3,
            "traits.renmae",
            id="misspelt-key",
        ),
        pytest.param(
            '# my mapping\n\n[trait]\nrename = { plan = "Plan" }\n',
            3,
            "trait",
            id="misspelt-section",
        ),
        pytest.param(
            '[events]\ndeny = ["Heartbeat"]\n\n[events.feilds]\n"*" = ["plan"]\n',
            4,
            "events.feilds",
            id="misspelt-subsection",
        ),
        pytest.param(
            '[identity]\naccount_paths = ["a"]\n\n[traits]\naccounts = ["plan"]\n',
            5,
            "traits.accounts",
            id="plural-key",
        ),
    ],
)
def test_unknown_key_names_its_line_and_key(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}," in message
    assert key in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(
            '[traits]\nignore = ["password"]\n\n[events]\nignore = ["Heartbeat"]\n',
            5,
            id="same-name-valid-in-earlier-section",
        ),
        pytest.param(
            '[identity]\naccount_paths = ["traits.company.id"]\naccount = ["x"]\n',
            3,
            id="prefix-of-a-valid-key-above",
        ),
    ],
)
def test_unknown_key_line_is_the_line_of_the_bad_key(tmp_path: Path, text: str, line: int) -> None:
    with pytest.raises(MappingError) as info:
        load_mapping(write(tmp_path, text))
    assert f"line {line}," in str(info.value)


def test_wrong_value_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as info:
        load_mapping(write(tmp_path, "[events]\ndeny = 5\n"))
    assert "events.deny" in str(info.value)
    assert "line 2," in str(info.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("[traits]\nrename = { plan = }\n", 2, id="missing-value"),
        pytest.param('[traits]\naccount = ["plan"]\n\n[events\ndeny = []\n', 4, id="section"),
        pytest.param('[events]\ndeny = ["a"]\ndeny = ["b"]\n', 3, id="duplicate-key"),
    ],
)
def test_toml_syntax_error_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert str(path) in str(info.value)
    assert f"line {line}" in str(info.value)


def test_missing_file_is_a_mapping_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_directory_instead_of_a_file_is_a_mapping_error(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read"):
        load_mapping(tmp_path)


def test_trait_allow_list_and_company_name_from_the_file(tmp_path: Path) -> None:
    text = '[traits]\nallow = ["plan", "avatar"]\naccount_name_from_company = true\n'
    mapping = load_mapping(write(tmp_path, text))
    assert mapping.traits.account_name_from_company is True
    assert mapping.trait_wanted("plan") and mapping.trait_wanted("avatar")
    assert not mapping.trait_wanted("seats")


def test_by_default_every_trait_but_segments_reserved_ones_is_wanted() -> None:
    mapping = Mapping()
    assert mapping.traits.account_name_from_company is False
    assert mapping.trait_wanted("plan") and mapping.trait_wanted("email")
    assert not any(mapping.trait_wanted(t) for t in ("id", "avatar", "createdAt", "address"))
    renamed = Mapping(traits=TraitMap(rename={"createdAt": "Signed Up At"}))
    assert renamed.trait_wanted("createdAt")


def test_group_increment_and_contact_order_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        '[identity]\ncontact_order = ["email", "context.traits.login"]\n'
        '[group]\nname = true\nrename = { plan = "Plan Name" }\nignore = ["secret"]\n'
        '[events.increment]\n"Seat Added" = { attribute = "Seats", entity = "account" }\n'
    )
    mapping = load_mapping(path)
    assert mapping.identity.contact_order == ("email", "context.traits.login")
    assert [mapping.group.attribute(t) for t in ("name", "plan", "secret", "tier")] == [
        "Name", "Plan Name", None, "tier"
    ]  # fmt: skip
    assert mapping.events.increment["Seat Added"].entity == "account"
    assert Mapping().group.attribute("name") is None  # the CRM owns the Name by default


def test_an_increment_on_an_unknown_entity_names_its_key(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[events.increment]\n"X" = { attribute = "A", entity = "user" }\n')
    with pytest.raises(MappingError, match=r"key events\.increment\.X\.entity"):
        load_mapping(path)
