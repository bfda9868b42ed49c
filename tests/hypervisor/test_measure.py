"""Runtime measurement: where the kernel's code is, what counts as a difference, and the
definition rules that go with measured regions."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmig.hypervisor.image import build_image
from trustmig.hypervisor.measure import Measurement, MeasurementError, kernel_text_region
from trustmig.hypervisor.spec import DefinitionError, parse_definition


def test_the_lab_kernel_code_lies_at_16_mib() -> None:
    r = kernel_text_region(build_image().kernel)
    assert r.name == "kernel-text" and r.gpa == 0x1000000
    assert r.size % 4096 == 0 and 1 << 20 < r.size < 64 << 20


def test_not_a_kernel_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(MeasurementError, match="not a bzImage"):
        kernel_text_region(junk)


def test_a_missing_or_changed_region_is_a_difference() -> None:
    m = Measurement({"kernel-text": "a" * 64, "extra": "b" * 64}, 1.0)
    assert m.differs_from({"kernel-text": "a" * 64, "extra": "b" * 64}) == []
    assert m.differs_from({"kernel-text": "c" * 64, "extra": "b" * 64}) == ["kernel-text"]
    assert m.differs_from({"kernel-text": "a" * 64}) == ["extra"]


def test_measured_regions_pin_the_kernel_and_must_fit_the_guest() -> None:
    region = {"name": "kernel-text", "gpa": 0x1000000, "size": 0xE02000}
    spec = parse_definition({"name": "vm1", "memory_mib": 256, "measure": [region]})
    assert "nokaslr" in spec.kernel_cmdline().split()
    assert "nokaslr" not in parse_definition({"name": "vm1"}).kernel_cmdline()
    with pytest.raises(DefinitionError, match="ends beyond the guest's 64 MiB"):
        parse_definition({"name": "vm1", "memory_mib": 64, "workload": {"mem_mib": 8},
                          "measure": [{**region, "gpa": 0x3800000}]})  # fmt: skip
    with pytest.raises(DefinitionError, match=r"measure\.0\.size"):
        parse_definition({"name": "vm1", "measure": [{**region, "size": 1 << 40}]})
