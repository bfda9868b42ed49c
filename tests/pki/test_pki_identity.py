"""Pure naming rules and the encoding of the roles extension."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmig.pki import ROLES, InvalidInput
from trustmig.pki.identity import (
    check_roles,
    decode_roles_extension,
    encode_roles_extension,
)

tenants = st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", fullmatch=True)


@given(roles=st.lists(st.sampled_from(ROLES), min_size=1), tenant=tenants)
def test_roles_extension_round_trip(roles: list[str], tenant: str | None) -> None:
    canonical = check_roles(roles)
    assert set(canonical) == set(roles)
    assert list(canonical) == sorted(set(roles), key=ROLES.index)
    assert decode_roles_extension(encode_roles_extension(canonical, tenant)) == (canonical, tenant)


def test_roles_extension_is_canonical_json_in_a_utf8string() -> None:
    value = encode_roles_extension(("owner", "auditor"), "t")
    body = b'{"roles":["owner","auditor"],"tenant":"t"}'
    assert value == b"\x0c" + bytes([len(body)]) + body


@pytest.mark.parametrize(
    "value",
    [b"", b"\x04\x02{}", b"\x0c\x05{}", b"\x0c\x02{}", b'\x0c\x0f{"roles":"x"}  '],
)
def test_malformed_roles_extension_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_roles_extension(value)


def test_check_roles_messages() -> None:
    with pytest.raises(InvalidInput) as info:
        check_roles(["owner", "superuser"])
    assert str(info.value) == (
        "unknown role 'superuser': valid roles are owner, operator, tenant-admin, "
        "cluster-admin, security-admin, auditor"
    )
