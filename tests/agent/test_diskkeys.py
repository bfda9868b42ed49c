"""Disk keys: made and sealed at first start, released only wrapped for one attested session,
received and sealed by the destination, forgotten where the VM left (with a store in memory:
the sealing itself is the TPM's, tested with swtpm elsewhere)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from trustmig.agent.diskkeys import DiskKeys, key_name
from trustmig.agent.errors import Code, RequestError
from trustmig.hypervisor.spec import VMSpec

MID = "6f1c1a52-5c4e-4a40-9d60-0d7d0f3a1b11"


class Store:
    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}

    def seal_new(self, name: str, secret: bytes) -> None:
        self.secrets[name] = secret

    def unseal(self, name: str) -> bytes | None:
        return self.secrets.get(name)

    def forget(self, name: str) -> bool:
        return self.secrets.pop(name, None) is not None


def _keys(store: Store | None = None) -> tuple[DiskKeys, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    return DiskKeys(store, lambda kind, **f: events.append((kind, f)), "host-a"), events


def _spec(tmp_path: Path, size: int | None = 8) -> VMSpec:
    disk = {"id": "sec", "path": str(tmp_path / "sec.qcow2"), "encrypt": "luks",
            "size_mib": size}  # fmt: skip
    return VMSpec.model_validate(
        {"name": "vm1", "disks": [disk, {"id": "plain", "path": "/x.raw"}]}
    )


def test_key_names_fit_the_store() -> None:
    name = key_name("a" * 63, "disk_with_long")
    assert re.match(r"^[a-z0-9._-]{1,63}$", name) and name != key_name("a" * 63, "other")


def test_first_start_creates_and_seals_then_reuses(tmp_path: Path) -> None:
    store = Store()
    keys, events = _keys(store)
    spec, got = asyncio.run(keys.for_start(_spec(tmp_path), "alice"))
    assert set(got) == {"sec"} and store.secrets == {key_name("vm1", "sec"): got["sec"]}
    assert spec.disks[0].virtual_size == 8 << 20 and spec.disks[1].virtual_size is None
    assert [e[1]["outcome"] for e in events] == ["created", "used"]
    _, again = asyncio.run(keys.for_start(_spec(tmp_path), "alice"))
    assert again == got


def test_start_refuses_what_it_cannot_open(tmp_path: Path) -> None:
    keys, _ = _keys(Store())
    with pytest.raises(RequestError, match="give it size_mib"):
        asyncio.run(keys.for_start(_spec(tmp_path, size=None), None))
    (tmp_path / "sec.qcow2").write_bytes(os.urandom(512))
    with pytest.raises(RequestError, match="holds no key for it") as ei:
        asyncio.run(keys.for_start(_spec(tmp_path), None))
    assert ei.value.code == Code.REFUSED
    without_tpm, _ = _keys(None)
    with pytest.raises(RequestError, match=r"enable \[attestation\]"):
        asyncio.run(without_tpm.for_start(_spec(tmp_path), None))


def _with_key(tmp_path: Path) -> tuple[VMSpec, Store, bytes]:
    spec = _spec(tmp_path)
    store = Store()
    key = os.urandom(32)
    store.seal_new(key_name("vm1", "sec"), key)
    return spec, store, key


def test_released_key_opens_only_in_its_session(tmp_path: Path) -> None:
    spec, store, key = _with_key(tmp_path)
    src, src_events = _keys(store)
    wrap = os.urandom(32)
    wrapped = asyncio.run(src.release(spec, "host-b", MID, wrap, "attested"))
    assert set(wrapped) == {"sec"} and key.hex() not in str(wrapped)
    assert (
        src_events[-1][1]["outcome"] == "released" and src_events[-1][1]["data"]["to"] == "host-b"
    )
    dst_store = Store()
    dst, dst_events = _keys(dst_store)
    for wrong_wrap, mid in ((os.urandom(32), MID), (wrap, MID.replace("6", "7"))):
        with pytest.raises(RequestError, match="not wrapped for this attested session") as ei:
            asyncio.run(dst.receive(spec, "host-a", mid, wrong_wrap, wrapped))
        assert ei.value.code == Code.INVALID
    assert dst_store.secrets == {} and dst_events == []
    got = asyncio.run(dst.receive(spec, "host-a", MID, wrap, wrapped))
    assert got == {"sec": key} and dst_store.secrets == {key_name("vm1", "sec"): key}
    assert dst_events[-1][1]["outcome"] == "received"


@pytest.mark.parametrize("wrapped", [{}, {"sec": "AAAA", "other": "AAAA"}, {"sec": "not base64!"}])
def test_malformed_key_sets_are_refused(tmp_path: Path, wrapped: dict[str, str]) -> None:
    dst, _ = _keys(Store())
    with pytest.raises(RequestError) as ei:
        asyncio.run(dst.receive(_spec(tmp_path), "host-a", MID, os.urandom(32), wrapped))
    assert ei.value.code == Code.INVALID and "\n" not in str(ei.value)


def test_forget_deletes_and_audits_once(tmp_path: Path) -> None:
    spec, store, _ = _with_key(tmp_path)
    keys, events = _keys(store)
    asyncio.run(keys.forget(spec, MID, "handed over"))
    asyncio.run(keys.forget(spec, MID, "handed over"))
    assert store.secrets == {} and [e[1]["outcome"] for e in events] == ["forgotten"]
