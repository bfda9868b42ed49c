"""Pure parts of the Debian guest build: module load order and the definition it produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmig.hypervisor.debian import DebianImage, debian_definition, module_load_order
from trustmig.hypervisor.image import ImageBuildError
from trustmig.hypervisor.spec import parse_definition

DEP = """kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""  # noqa: E501


def test_dependencies_load_first_and_once() -> None:
    order = [p.rsplit("/", 1)[1] for p in module_load_order(DEP, ("virtio_pci", "virtio_blk"))]
    assert order == ["virtio_pci_legacy_dev.ko", "virtio_ring.ko", "virtio.ko", "virtio_pci.ko",
                     "virtio_blk.ko"]  # fmt: skip


def test_a_missing_module_is_named() -> None:
    with pytest.raises(ImageBuildError, match="no module virtio_net"):
        module_load_order(DEP, ("virtio_net",))


def test_the_debian_definition_is_valid_and_migratable(tmp_path: Path) -> None:
    img = DebianImage(*(tmp_path / n for n in ("root.img", "vmlinuz", "initrd.gz", "k", "kh")),
                      key="k", kernel_version="6.1")  # fmt: skip
    spec = parse_definition(debian_definition("web", img, tmp_path / "web.qcow2", ssh_port=2222))
    assert spec.disks[0].bus == "virtio-blk"  # QEMU 7.2 cannot migrate nvme
    assert spec.disks[0].shared and spec.nics[0].model == "virtio-net-pci"
    assert spec.forwards()[0].guest_port == 22 and spec.waits_for_workload
    assert "root=/dev/vda" in spec.kernel_cmdline() and "tm.mem_mib=32" in spec.kernel_cmdline()
