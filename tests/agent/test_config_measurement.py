"""What of host.toml is measured: trust-relevant settings only, so ports and limits are an edit."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmig.agent.provisioning import config_measurement
from trustmig.config import ConfigError, load_config

BASE = """\
name = "host-a"
[control]
listen = "127.0.0.1:7000"
[labels]
country = "DE"
[peers.host-b]
control = "127.0.0.1:7100"
labels = { country = "FR" }
"""


def digest(tmp_path: Path, text: str) -> bytes:
    p = tmp_path / "host.toml"
    p.write_text(text)
    return config_measurement(load_config(p), p)[1]


@pytest.mark.parametrize(
    "edit",
    [
        ("7000", "7001"),
        ("127.0.0.1:7100", "127.0.0.1:7200"),
        ('country = "DE"', 'country = "DE"\n[admission]\nmax_per_tenant = 9'),
        ('country = "DE"', 'country = "DE"\n[guard]\nidle_timeout_s = 60'),
        ('country = "DE"', 'country = "DE"\n[migration]\npeer_grace_s = 90'),
    ],
)
def test_ports_limits_and_timeouts_are_not_measured(tmp_path: Path, edit: tuple[str, str]) -> None:
    assert digest(tmp_path, BASE) == digest(tmp_path, BASE.replace(*edit))


@pytest.mark.parametrize(
    "edit",
    [
        ('country = "DE"', 'country = "US"'),
        ('{ country = "FR" }', '{ country = "US" }'),
        ("[peers.host-b]", '[peers.host-c]\ncontrol = "127.0.0.1:1"\n[peers.host-b]'),
        ('country = "DE"', 'country = "DE"\n[guard]\nallowed_networks = ["10.0.0.0/8"]'),
        ('name = "host-a"', 'name = "host-a"\n[attestation]\nauto_enroll = true'),
    ],
)
def test_identity_peers_labels_and_allow_lists_are(tmp_path: Path, edit: tuple[str, str]) -> None:
    assert digest(tmp_path, BASE) != digest(tmp_path, BASE.replace(*edit))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[guard]\nmax_conn_per_ipp = 3\n", "unknown key 'max_conn_per_ipp' under [guard]"),
        ('[admission]\nmax_per_tenant = "x"\n', "[admission] max_per_tenant: Input should be"),
        ("[admission]\nmax_per_tenant = -1\n", "max_per_tenant is -1; it must be an integer"),
        ("[agent]\naudit_witness_interval_s = 0\n", "agent.audit_witness_interval_s: Input"),
    ],
)
def test_every_section_is_one_line_naming_the_key(tmp_path: Path, extra: str, message: str) -> None:
    p = tmp_path / "host.toml"
    p.write_text(BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert message in str(err.value) and "\n" not in str(err.value)
