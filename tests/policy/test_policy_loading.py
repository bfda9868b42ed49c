"""Parsing and validation of VM and host policies, and the line numbers in their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import HOST_TOML, VM_TOML, VM_YAML

from trustmig.policy import (
    PolicyError,
    load_host_policy,
    load_vm_policy,
    parse_host_policy,
    parse_vm_policy,
)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_example_vm_policy_toml_parses_to_expected_values() -> None:
    p = parse_vm_policy(VM_TOML)
    assert (p.vm, p.tenant, p.owner) == ("web-1", "acme", "alice")
    assert p.migrate.allowed_users == ["alice"]
    assert p.migrate.allowed_roles == ["operator"]
    assert p.migrate.max_per_hour == 4
    assert p.migrate.postcopy is False
    assert p.destinations.countries == ["DE", "FR"]
    assert p.destinations.min_security_level == 2
    assert p.attestation.profile == "strict"
    assert p.signed_by is None


def test_yaml_and_toml_give_the_same_policy() -> None:
    assert parse_vm_policy(VM_YAML, fmt="yaml") == parse_vm_policy(VM_TOML)


def test_host_policy_parses() -> None:
    h = parse_host_policy(HOST_TOML)
    assert h.host == "hostB"
    assert (h.labels.country, h.labels.zone, h.labels.security_level) == ("DE", "eu-1", 3)
    assert h.accept.sources == ["hostA", "hostC"]
    assert h.accept.tenants == ["acme"]
    assert h.accept.require_signed_vm_policy is True


def test_defaults_are_restrictive() -> None:
    p = parse_vm_policy('vm = "v"\ntenant = "t"\nowner = "o"\nserial = 1\n')
    assert p.migrate.allowed_users == [] and p.migrate.allowed_roles == []
    assert p.migrate.postcopy is False
    assert p.attestation.profile == "strict"
    h = parse_host_policy('host = "h"\n[labels]\ncountry = "DE"\n')
    assert h.accept.sources == [] and h.accept.tenants == []
    assert h.accept.require_signed_vm_policy is True


def test_countries_not_a_list_names_line_and_key() -> None:
    text = VM_TOML.replace('countries = ["DE", "FR"]', 'countries = "DE"')
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="policy.toml")
    line = _line_of(text, "countries")
    msg = str(err.value)
    assert msg.startswith(
        f"policy.toml line {line}: destinations.countries: expected a list of ISO"
    )
    assert "\n" not in msg


def test_lowercase_country_code_rejected() -> None:
    with pytest.raises(PolicyError, match=r"destinations\.countries: expected a list of ISO"):
        parse_vm_policy(VM_TOML.replace('"FR"', '"fr"'))


def test_unknown_key_rejected_with_line_and_allowed_keys() -> None:
    text = VM_TOML.replace("max_per_hour = 4", "max_per_houre = 4")
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.toml")
    line = _line_of(text, "max_per_houre")
    assert str(err.value).startswith(f"p.toml line {line}: migrate.max_per_houre: unknown key")
    assert "max_per_hour" in str(err.value).split("allowed keys:")[1]


def test_unknown_top_level_table_rejected() -> None:
    text = VM_TOML + "\n[network]\nmtu = 9000\n"
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.toml")
    assert f"line {_line_of(text, '[network]')}: network: unknown key" in str(err.value)


def test_unknown_key_in_host_labels_rejected() -> None:
    text = HOST_TOML.replace("security_level = 3", "securitylevel = 3")
    with pytest.raises(PolicyError) as err:
        parse_host_policy(text, source="host.toml")
    assert f"line {_line_of(text, 'securitylevel')}: labels.securitylevel: unknown key" in str(
        err.value
    )


def test_malformed_toml_reports_parser_line() -> None:
    text = VM_TOML.replace("max_per_hour = 4", "max_per_hour = ")
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.toml")
    assert str(err.value).startswith(f"p.toml line {_line_of(text, 'max_per_hour')}: invalid TOML")


def test_duplicate_toml_key_rejected() -> None:
    text = VM_TOML.replace("postcopy = false", "postcopy = false\npostcopy = true")
    with pytest.raises(PolicyError, match=r"line \d+: invalid TOML"):
        parse_vm_policy(text)


def test_malformed_yaml_reports_line() -> None:
    text = VM_YAML.replace("countries: [DE, FR]", "countries: [DE, FR")
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.yaml", fmt="yaml")
    assert "p.yaml line " in str(err.value) and "invalid YAML" in str(err.value)


def test_yaml_validation_error_points_at_exact_key_line() -> None:
    text = VM_YAML.replace("max_per_hour: 4", "max_per_hour: many")
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.yaml", fmt="yaml")
    line = _line_of(text, "max_per_hour")
    assert str(err.value).startswith(f"p.yaml line {line}: migrate.max_per_hour: ")


def test_yaml_unknown_key_rejected() -> None:
    text = VM_YAML + "  colour: blue\n"
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.yaml", fmt="yaml")
    assert f"line {_line_of(text, 'colour')}: destinations.colour: unknown key" in str(err.value)


def test_yaml_duplicate_key_rejected_not_last_wins() -> None:
    text = VM_YAML + "owner: mallory\n"
    with pytest.raises(PolicyError, match=r"line \d+: duplicate key 'owner'"):
        parse_vm_policy(text, fmt="yaml")


def test_yaml_norway_problem_is_an_error_not_false() -> None:
    with pytest.raises(PolicyError, match=r"destinations\.countries"):
        parse_vm_policy(VM_YAML.replace("[DE, FR]", "[DE, NO]"), fmt="yaml")


def test_string_number_not_coerced() -> None:
    with pytest.raises(PolicyError, match=r"migrate\.max_per_hour"):
        parse_vm_policy(VM_TOML.replace("max_per_hour = 4", 'max_per_hour = "4"'))


def test_auditor_cannot_be_an_allowed_role() -> None:
    with pytest.raises(PolicyError, match="auditors may never migrate"):
        parse_vm_policy(
            VM_TOML.replace('allowed_roles = ["operator"]', 'allowed_roles = ["auditor"]')
        )


def test_unknown_role_rejected() -> None:
    with pytest.raises(PolicyError, match="unknown role 'admin'"):
        parse_vm_policy(VM_TOML.replace('["operator"]', '["admin"]'))


def test_bad_window_rejected_with_reason() -> None:
    text = VM_TOML.replace("windows = []", 'windows = ["Mon-Fri 22:00-25:00 UTC"]')
    with pytest.raises(PolicyError) as err:
        parse_vm_policy(text, source="p.toml")
    assert f"line {_line_of(text, 'windows')}: migrate.windows: window" in str(err.value)
    assert "out of range" in str(err.value)


def test_missing_required_key_named() -> None:
    with pytest.raises(PolicyError, match="owner: required key is missing"):
        parse_vm_policy(VM_TOML.replace('owner = "alice"\n', ""))


def test_empty_and_non_mapping_documents_rejected() -> None:
    with pytest.raises(PolicyError, match="empty"):
        parse_vm_policy("", fmt="yaml")
    with pytest.raises(PolicyError, match="table of keys"):
        parse_vm_policy("- a\n- b\n", fmt="yaml")


def test_oversized_policy_rejected() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        parse_vm_policy(VM_TOML + "#" * 70_000)


def test_unknown_format_rejected() -> None:
    with pytest.raises(PolicyError, match="unknown policy format"):
        parse_vm_policy(VM_TOML, fmt="json")  # type: ignore[arg-type]


def test_load_from_files(tmp_path: Path) -> None:
    (tmp_path / "web-1.toml").write_text(VM_TOML)
    (tmp_path / "web-1.yml").write_text(VM_YAML)
    (tmp_path / "hostB.toml").write_text(HOST_TOML)
    assert load_vm_policy(tmp_path / "web-1.toml") == load_vm_policy(tmp_path / "web-1.yml")
    assert load_host_policy(tmp_path / "hostB.toml").labels.country == "DE"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(VM_TOML.replace('"FR"', "FR"))
    with pytest.raises(PolicyError, match=rf"^{bad} line \d+: invalid TOML"):
        load_vm_policy(bad)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_vm_policy(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match=r"name it \.toml or \.yaml"):
        load_vm_policy(tmp_path / "policy.ini")


def test_models_are_immutable() -> None:
    p = parse_vm_policy(VM_TOML)
    with pytest.raises(Exception, match="frozen"):
        p.owner = "mallory"


def test_serial_and_validity_period() -> None:
    from datetime import UTC, datetime

    base = 'vm = "v"\ntenant = "t"\nowner = "o"\n'
    with pytest.raises(PolicyError, match="serial"):
        parse_vm_policy(base)
    p = parse_vm_policy(
        base + "serial = 7\nvalid_from = 2027-01-01T00:00:00Z\n"
        'valid_until = "2027-02-01T00:00:00+00:00"\n'
    )
    assert p.serial == 7
    assert p.validity_problem(datetime(2026, 12, 31, tzinfo=UTC)) == (
        "serial 7 is valid only from 2027-01-01T00:00:00+00:00"
    )
    assert p.validity_problem(datetime(2027, 1, 15, tzinfo=UTC)) is None
    assert p.validity_problem(datetime(2027, 2, 1, tzinfo=UTC)) == (
        "serial 7 expired on 2027-02-01T00:00:00+00:00"
    )
    with pytest.raises(PolicyError, match="timezone offset"):
        parse_vm_policy(base + "serial = 1\nvalid_until = 2027-01-01T00:00:00\n")
    with pytest.raises(PolicyError, match="valid_until must come after valid_from"):
        parse_vm_policy(
            base + "serial = 1\nvalid_from = 2027-01-02T00:00:00Z\n"
            "valid_until = 2027-01-01T00:00:00Z\n"
        )
    with pytest.raises(PolicyError, match="serial"):
        parse_vm_policy(base + "serial = 0\n")
