"""VM definitions: what is accepted, what is refused in one line naming the field, and the QEMU
device model a definition turns into."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from trustmig.hypervisor.accel import AccelChoice
from trustmig.hypervisor.devices import (
    HostCannotRun,
    HostNet,
    disk_identity,
    host_problems,
    require_host_can_run,
    stamp_disks,
)
from trustmig.hypervisor.image import GuestImage
from trustmig.hypervisor.qemu import QemuVM
from trustmig.hypervisor.spec import DefinitionError, VMSpec, load_definition, parse_definition

MAC = "52:54:00:12:34:56"


def _definition(tmp_path: Path, **over: Any) -> dict[str, Any]:
    disk = tmp_path / "root.qcow2"
    disk.write_bytes(b"\0" * 4096)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    d: dict[str, Any] = {
        "name": "web-1",
        "machine": "q35",
        "cpu": "qemu64",
        "memory_mib": 768,
        "boot": {"kind": "kernel", "kernel": str(kernel), "cmdline": "root=/dev/nvme0n1 rw"},
        "disks": [{"id": "root", "path": str(disk), "bus": "nvme", "shared": True}],
        "nics": [{"id": "net0", "mac": MAC,
                  "backend": {"kind": "user", "forwards": [{"host_port": 2222,
                                                             "guest_port": 22}]}}],
    }  # fmt: skip
    d.update(over)
    return d


def _qemu(spec: VMSpec, tmp_path: Path, net: HostNet | None = None) -> QemuVM:
    image = GuestImage(kernel=tmp_path / "lab-kernel", initrd=tmp_path / "lab-initrd", key="k")
    accel = AccelChoice(accel="tcg", cpu="qemu64", warning=None)
    return QemuVM(spec, image, tmp_path / "run", accel, host_net=net)


def test_a_lab_guest_is_the_default_and_runs_the_workload() -> None:
    spec = VMSpec(name="vm1")
    assert spec.boot.kind == "lab" and spec.workload is not None and spec.waits_for_workload
    assert "tm.mem_mib=64" in spec.kernel_cmdline()


def test_a_full_definition_round_trips_through_json(tmp_path: Path) -> None:
    spec = parse_definition(_definition(tmp_path))
    again = VMSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec
    assert spec.workload is None and not spec.waits_for_workload
    assert spec.kernel_cmdline() == "root=/dev/nvme0n1 rw"


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"memroy_mib": 512}, "memroy_mib: unknown field"),
        ({"disks": [{"id": "root", "path": "disk.qcow2"}]}, "disks.0.path: disk path must be"),
        ({"disks": [{"id": "root", "path": "/d", "bus": "scsi"}]}, "disks.0.bus: Input should"),
        ({"disks": [{"id": "root", "path": "/d", "cache": "fast"}]}, "disks.0.cache:"),
        ({"nics": [{"id": "n0", "mac": "01:00:5e:00:00:01"}]}, "nics.0.mac: mac must be a unicast"),
        ({"nics": [{"id": "n0"}]}, "nics.0.mac: missing"),
        (
            {"nics": [{"id": "n0", "mac": MAC, "backend": {"kind": "bridge", "bridge": "a b"}}]},
            "nics.0.backend.bridge: bridge must be",
        ),
        ({"boot": {"kind": "kernel"}}, "boot.kernel: missing"),
        ({"boot": {"kind": "efi"}}, "boot: Input tag 'efi'"),
        ({"boot": {"kind": "disk"}, "workload": {}}, "workload settings travel"),
        ({"name": "Web 1"}, "name: VM name must be"),
        ({"memory_mib": 16}, "memory_mib: Input should be greater"),
        ({"boot": {"kind": "lab"}, "workload": {"mem_mib": 4000}}, "workload needs about"),
    ],
)
def test_bad_definitions_are_refused_in_one_line_naming_the_field(
    tmp_path: Path, change: dict[str, Any], line: str
) -> None:
    with pytest.raises(DefinitionError) as ei:
        parse_definition(_definition(tmp_path, **change))
    msg = str(ei.value)
    assert line in msg and "\n" not in msg, msg


def test_duplicate_device_ids_and_macs_are_refused(tmp_path: Path) -> None:
    d = _definition(tmp_path)
    d["nics"] = [d["nics"][0], {**d["nics"][0], "id": "net1"}]
    with pytest.raises(DefinitionError, match="same mac"):
        parse_definition(d)
    d["nics"][1] = {**d["nics"][1], "id": "root", "mac": "52:54:00:00:00:02"}
    with pytest.raises(DefinitionError, match="root used twice"):
        parse_definition(d)


def test_a_definition_file_error_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "a"\n[[disks]]\nid = "d0"\npath = "/x"\nformat = "vmdk"\n')
    with pytest.raises(DefinitionError) as ei:
        load_definition(f)
    assert str(ei.value).startswith(f"{f}: disks.0.format:")
    f.write_text("name = \n")
    with pytest.raises(DefinitionError, match="not valid TOML"):
        load_definition(f)


def test_the_device_model_is_what_the_definition_says(tmp_path: Path) -> None:
    spec = parse_definition(_definition(tmp_path))
    argv = _qemu(spec, tmp_path, HostNet(forward_address="127.0.1.7")).argv()
    joined = " ".join(argv)
    assert argv[argv.index("-machine") + 1] == "q35"
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinuz")
    assert "-initrd" not in argv
    assert f"file={tmp_path / 'root.qcow2'},if=none,id=drive-root,format=qcow2,cache=none" in joined
    assert "nvme,drive=drive-root,id=root,serial=tm-root" in joined
    assert "user,id=net-net0,hostfwd=tcp:127.0.1.7:2222-:22" in joined
    assert f"virtio-net-pci,netdev=net-net0,mac={MAC},id=net0" in joined


def test_a_disk_booted_guest_gets_no_kernel_and_a_boot_order(tmp_path: Path) -> None:
    d = _definition(tmp_path, boot={"kind": "disk"})
    d["disks"][0].update(bus="virtio-blk", read_only=True, cache="writeback")
    argv = _qemu(parse_definition(d), tmp_path).argv()
    joined = " ".join(argv)
    assert "-kernel" not in argv and "-readconfig" not in argv
    assert "readonly=on" in joined and "cache=writeback" in joined
    assert "virtio-blk-pci,drive=drive-root,id=root,serial=tm-root,bootindex=0" in joined


def test_a_path_with_a_comma_cannot_inject_qemu_options(tmp_path: Path) -> None:
    odd = tmp_path / "a,format=raw"
    odd.write_bytes(b"")
    d = _definition(tmp_path)
    d["disks"][0]["path"] = str(odd)
    joined = " ".join(_qemu(parse_definition(d), tmp_path).argv())
    assert "a,,format=raw,if=none" in joined


def test_shared_disks_are_stamped_with_an_identity_the_destination_must_match(
    tmp_path: Path,
) -> None:
    spec = stamp_disks(parse_definition(_definition(tmp_path)))
    disk = spec.disks[0]
    assert disk.identity and disk.identity == disk_identity(disk.path, create=False)
    boot = spec.boot
    assert boot.kind == "kernel" and boot.kernel_sha256
    net = HostNet(forward_address="127.0.1.9")
    assert host_problems(spec, net, incoming=True) == []
    # another image at the same path (a host that does not share the storage)
    disk.path.unlink()
    disk.path.write_bytes(b"\0" * 4096)
    with pytest.raises(HostCannotRun, match="is not the source's image"):
        require_host_can_run(spec, net, incoming=True, host="host-b")


def test_the_destination_names_what_it_lacks(tmp_path: Path) -> None:
    d = _definition(tmp_path)
    d["nics"].append({"id": "net1", "mac": "52:54:00:00:00:09",
                      "backend": {"kind": "bridge", "bridge": "tmnobr0"}})  # fmt: skip
    spec = stamp_disks(parse_definition(d))
    (tmp_path / "vmlinuz").write_bytes(b"another kernel")
    local = {**d["disks"][0], "id": "data", "path": str(tmp_path / "data.qcow2"), "shared": False}
    (tmp_path / "data.qcow2").write_bytes(b"")
    spec = spec.model_copy(update={"disks": [*spec.disks, parse_definition(
        {**d, "disks": [local]}).disks[0]]})  # fmt: skip
    problems = host_problems(spec, HostNet(forward_address="127.0.1.9"), incoming=True)
    text = " | ".join(problems)
    assert "boot.kernel" in text and "differs from the source's" in text
    assert "bridge tmnobr0 does not exist" in text
    assert "disk data" not in text  # a local disk is copied: its target is created there
    with pytest.raises(HostCannotRun) as ei:
        require_host_can_run(spec, HostNet(), incoming=True, host="host-b")
    assert str(ei.value).startswith("host-b cannot run VM web-1: ") and "more)" in str(ei.value)


def test_a_forwarded_port_in_use_is_named(tmp_path: Path) -> None:
    import socket

    spec = parse_definition(_definition(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.1.11", 2222))
        s.listen()
        problems = host_problems(spec, HostNet(forward_address="127.0.1.11"), incoming=False)
    assert problems == [
        "forwarded port tcp 127.0.1.11:2222 is not free (Address already in use)"
    ], problems


def test_a_missing_disk_is_refused_before_start(tmp_path: Path) -> None:
    d = _definition(tmp_path)
    os.unlink(d["disks"][0]["path"])
    with pytest.raises(HostCannotRun, match=r"disk root: .* does not exist on this host"):
        stamp_disks(parse_definition(d))


def test_vm_define_refuses_a_bad_file_in_one_line_before_contacting_anyone(
    tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    f = tmp_path / "web.toml"
    f.write_text('name = "web"\nmemory_mib = 512\n[[nics]]\nid = "net0"\nmac = "zz"\n')
    p = subprocess.run(
        [sys.executable, "-m", "trustmig.cli.main", "vm", "define", str(f), "--json",
         "--agent", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1
    err = json.loads(p.stdout)["error"]
    assert err == f"{f}: nics.0.mac: mac must be six hex pairs like 52:54:00:12:34:56", err


def test_machine_aliases_are_pinned_to_the_versioned_type_and_unknown_types_named() -> None:
    from trustmig.hypervisor.devices import machine_types, parse_machine_help

    types = parse_machine_help(
        "Supported machines are:\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
        "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
        "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
    )
    assert (
        types.canonical("pc") == "pc-i440fx-7.2" and types.canonical("pc-q35-7.2") == "pc-q35-7.2"
    )
    with pytest.raises(HostCannotRun, match=r"machine type pc-q35-99\.0 is not offered"):
        types.canonical("pc-q35-99.0")
    real = machine_types("qemu-system-x86_64")  # the host's own QEMU
    assert real.canonical("pc").startswith("pc-i440fx-")
