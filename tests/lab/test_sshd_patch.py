"""Locating sshd's password check in a binary and patching it to the same length."""

from __future__ import annotations

import pytest

from trustmig.lab.sshd_patch import PatchNotFound, find_password_check

# mov %rax,%rdi; test %rax,%rax; je rel32; mov %rbx,%rsi; call strcmp; test %eax,%eax; sete %al
CHECK = bytes.fromhex("4889c74885c00f845cffffff4889dee83783ffff85c00f94c00fb6c0")


def _binary(at: int, copies: int = 1) -> bytes:
    body = bytearray(b"\x90" * 0x20000)
    for i in range(copies):
        off = at + i * 0x8000
        body[off : off + len(CHECK)] = CHECK
    return bytes(body)


def test_the_check_is_found_and_only_test_eax_changes() -> None:
    p = find_password_check(_binary(0x16135))
    assert p.file_offset == 0x16135 + CHECK.index(bytes.fromhex("85c00f94"))
    assert len(p.original) == len(p.patched) == 64
    diff = [i for i, (a, b) in enumerate(zip(p.original, p.patched, strict=True)) if a != b]
    assert len(diff) == 1 and p.original[diff[0]] == 0x85 and p.patched[diff[0]] == 0x31


def test_the_signature_stays_within_the_code_page() -> None:
    at = 0x17000 - 10  # the check sits at the end of a 4 KiB page
    p = find_password_check(_binary(at))
    start = p.file_offset - p.original.index(b"\x85\xc0\x0f\x94")
    assert start // 4096 == (start + len(p.original) - 1) // 4096


@pytest.mark.parametrize("copies", [0, 2])
def test_an_sshd_without_exactly_one_check_is_not_patched(copies: int) -> None:
    with pytest.raises(PatchNotFound, match=f"found {copies}"):
        find_password_check(_binary(0x10000, copies))
