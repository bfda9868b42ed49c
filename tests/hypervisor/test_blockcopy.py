"""The destination's side of a disk copy that needs no QEMU: where targets go, how they are
created (same format and size) and removed again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trustmig.hypervisor.blockcopy import (
    BlockCopyError,
    copied_disks,
    create_targets,
    remove_targets,
    target_spec,
)
from trustmig.hypervisor.spec import VMSpec, parse_definition


def _spec(tmp_path: Path) -> VMSpec:
    return parse_definition({
        "name": "web", "memory_mib": 256,
        "disks": [
            {"id": "root", "path": str(tmp_path / "a.qcow2"), "virtual_size": 64 << 20},
            {"id": "data", "path": str(tmp_path / "b.raw"), "format": "raw",
             "virtual_size": 8 << 20},
            {"id": "san", "path": "/srv/shared/c.qcow2", "shared": True},
        ],
    })  # fmt: skip


def test_local_disks_get_targets_of_the_same_format_and_size_in_the_host_directory(
    tmp_path: Path,
) -> None:
    spec = target_spec(_spec(tmp_path), tmp_path / "host-b" / "disks" / "web-1")
    assert [d.id for d in copied_disks(spec)] == ["root", "data"]
    paths = {d.id: d.path for d in spec.disks}
    assert paths["san"] == Path("/srv/shared/c.qcow2")  # shared storage is not copied
    made = create_targets(spec)
    assert made == [paths["root"], paths["data"]]
    for path, fmt, size in ((paths["root"], "qcow2", 64 << 20), (paths["data"], "raw", 8 << 20)):
        argv = ["qemu-img", "info", "--output=json", str(path)]
        info = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        assert info["format"] == fmt and info["virtual-size"] == size
        assert path.stat().st_mode & 0o777 == 0o600
    remove_targets(made)
    assert not (tmp_path / "host-b" / "disks" / "web-1").exists()


def test_an_existing_target_is_never_overwritten_and_nothing_is_left(tmp_path: Path) -> None:
    spec = target_spec(_spec(tmp_path), tmp_path / "t")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "data.raw").write_bytes(b"keep")
    with pytest.raises(BlockCopyError, match="already exists"):
        create_targets(spec)
    assert not (tmp_path / "t" / "root.qcow2").exists()
    assert (tmp_path / "t" / "data.raw").read_bytes() == b"keep"


def test_a_size_the_source_did_not_say_is_refused(tmp_path: Path) -> None:
    spec = parse_definition({"name": "web", "disks": [{"id": "d", "path": str(tmp_path / "x")}]})
    with pytest.raises(BlockCopyError, match="did not say its virtual size"):
        create_targets(target_spec(spec, tmp_path / "t"))
