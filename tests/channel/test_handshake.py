"""Handshake between real ClientHandshake and ServerHandshake objects with real certificates."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustmig.channel import ChannelError, Data, LocalIdentity
from trustmig.channel.wire import FRAME_HEADER, MsgType

from .helpers import DST, SRC, Pki, make_pair, make_pki, run_handshake


def test_full_handshake_agrees_on_keys(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id, n_streams=4)
    c, s = run_handshake(client, server)
    assert c.session_id == s.session_id and len(c.session_id) == 16
    assert c.transcript_hash == s.transcript_hash
    assert (c.peer_name, s.peer_name) == (DST, SRC)
    assert c.peer_info.name == DST and s.peer_info.name == SRC  # type: ignore[attr-defined]
    assert c.peer_evidence_summary == s.peer_evidence_summary == "none"
    assert c.n_streams == s.n_streams == 4
    assert c.migration_id == s.migration_id
    # keys agree on every stream and direction, and differ between them
    for stream in range(4):
        for d in ("c2s", "s2c"):
            sealer = c.session.sealer(stream, d)
            rec = sealer.seal(f"{stream}{d}".encode())
            expected = Data(len(f"{stream}{d}"), f"{stream}{d}".encode())
            assert s.session.opener(stream, d).feed(rec) == [expected]


def test_handshake_byte_by_byte_and_leftover(
    pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity
):
    client, server = make_pair(pki, src_id, dst_id)
    hello = client.start()
    flight = b"".join(server.receive(hello[i : i + 1]) for i in range(len(hello)))
    reply = b"".join(client.receive(flight[i : i + 1]) for i in range(len(flight)))
    assert client.result is None
    finished = server.receive(reply + b"RECORDS")
    assert server.leftover == b"RECORDS"
    client.receive(finished + b"MORE")
    assert client.result is not None and client.leftover == b"MORE"
    assert server.result is not None
    assert client.result.session_id == server.result.session_id


def test_chacha20_negotiated(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id, c_cipher="chacha20-poly1305")
    c, s = run_handshake(client, server)
    assert c.cipher == s.cipher == "chacha20-poly1305"
    rec = c.session.sealer(0, "c2s").seal(b"page")
    assert s.session.opener(0, "c2s").feed(rec) == [Data(4, b"page")]


def test_cipher_not_allowed_by_server(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(
        pki, src_id, dst_id, c_cipher="chacha20-poly1305", s_ciphers=("aes-256-gcm",)
    )
    with pytest.raises(ChannelError, match="no common cipher"):
        server.receive(client.start())


def test_ed25519_host_keys(pki: Pki):
    a = pki.issue(SRC, key=ed25519.Ed25519PrivateKey.generate())
    b = pki.issue(DST, key=ed25519.Ed25519PrivateKey.generate())
    c, s = run_handshake(*make_pair(pki, a, b))
    assert c.session_id == s.session_id


def test_evidence_bound_to_same_transcript_hash(
    pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity
):
    made: dict[str, bytes] = {}
    checked: dict[str, tuple[bytes, bytes]] = {}

    def maker(side: str):
        def make(th: bytes) -> bytes:
            made[side] = th
            return b"quote-of-" + side.encode() + th

        return make

    def verify(peer: str, evidence: bytes, th: bytes) -> str:
        checked[peer] = (evidence, th)
        assert evidence.endswith(th)
        return f"ok {peer}"

    client, server = make_pair(
        pki,
        src_id,
        dst_id,
        c_make_evidence=maker("src"),
        s_make_evidence=maker("dst"),
        c_verify_evidence=verify,
        s_verify_evidence=verify,
    )
    c, s = run_handshake(client, server)
    assert made["src"] == made["dst"] == c.transcript_hash == s.transcript_hash
    assert checked[DST][0] == b"quote-of-dst" + c.transcript_hash
    assert checked[SRC][0] == b"quote-of-src" + c.transcript_hash
    assert c.peer_evidence_summary == f"ok {DST}" and s.peer_evidence_summary == f"ok {SRC}"


def test_evidence_rejected(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    def reject(peer: str, evidence: bytes, th: bytes) -> str:
        raise ValueError("PCR 4 does not match the reference value")

    client, server = make_pair(pki, src_id, dst_id, c_verify_evidence=reject)
    with pytest.raises(ChannelError, match="evidence rejected: PCR 4"):
        run_handshake(client, server)
    assert client.result is None


def test_server_rejects_client_evidence(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    def reject(peer: str, evidence: bytes, th: bytes) -> str:
        if not evidence:
            raise ValueError("no evidence")
        return "ok"

    client, server = make_pair(pki, src_id, dst_id, s_verify_evidence=reject)
    with pytest.raises(ChannelError, match=f"client {SRC} attestation evidence rejected"):
        run_handshake(client, server)
    assert server.result is None


def test_wrong_ca(pki: Pki, dst_id: LocalIdentity):
    rogue = make_pki("rogue CA").issue(SRC)
    client, server = make_pair(pki, rogue, dst_id)
    with pytest.raises(ChannelError, match="not issued by the cluster CA"):
        run_handshake(client, server)


def test_expired_certificate(pki: Pki, src_id: LocalIdentity):
    now = dt.datetime.now(dt.UTC)
    old = pki.issue(
        DST, not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    client, server = make_pair(pki, src_id, old)
    with pytest.raises(ChannelError, match="expired"):
        run_handshake(client, server)


def _forged_identity(name: str, real: LocalIdentity) -> LocalIdentity:
    """An identity claiming ``name`` while holding another host's certificate and key
    (bypassing LocalIdentity's own consistency check, as a rogue receiver would)."""
    forged = object.__new__(LocalIdentity)
    object.__setattr__(forged, "name", name)
    object.__setattr__(forged, "cert_der", real.cert_der)
    object.__setattr__(forged, "private_key", real.private_key)
    return forged


def test_local_identity_refuses_certificate_for_other_name(pki: Pki):
    other = pki.issue("other-host.example")
    with pytest.raises(ChannelError, match="not issued to that name"):
        LocalIdentity(DST, other.cert_der, other.private_key)


def test_rogue_receiver_with_other_hosts_certificate(pki: Pki, src_id: LocalIdentity):
    rogue = _forged_identity(DST, pki.issue("other-host.example"))
    client, server = make_pair(pki, src_id, rogue)
    with pytest.raises(ChannelError, match=r"server certificate for dst-host\.example rejected"):
        run_handshake(client, server)
    assert client.result is None


def test_name_check_even_with_permissive_verifier(pki: Pki, src_id: LocalIdentity):
    """The channel checks the certificate names itself, not only through verify_peer."""
    rogue = _forged_identity(DST, pki.issue("other-host.example"))
    client, server = make_pair(pki, src_id, rogue, client_verifier=lambda der, name: None)
    with pytest.raises(ChannelError, match=r"other-host\.example'\], not for dst-host"):
        run_handshake(client, server)


def test_client_with_other_hosts_certificate(pki: Pki, dst_id: LocalIdentity):
    rogue = _forged_identity(SRC, pki.issue("other-host.example"))
    client, server = make_pair(pki, rogue, dst_id)
    with pytest.raises(ChannelError, match=r"client certificate for src-host\.example rejected"):
        run_handshake(client, server)
    assert server.result is None


def test_bad_signature(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id)
    flight = bytearray(server.receive(client.start()))
    # last bytes of the flight are the ServerAuth signature
    flight[-5] ^= 0x01
    with pytest.raises(ChannelError, match="signature is invalid"):
        client.receive(bytes(flight))


def test_tampered_server_hello_breaks_signature(
    pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity
):
    client, server = make_pair(pki, src_id, dst_id)
    flight = bytearray(server.receive(client.start()))
    (size,) = FRAME_HEADER.unpack_from(flight, 0)[:1]
    assert flight[4] == MsgType.SERVER_HELLO
    flight[FRAME_HEADER.size + size - 1] ^= 0x80  # last byte of the server random
    with pytest.raises(ChannelError, match="signature is invalid"):
        client.receive(bytes(flight))


def test_tampered_client_finished(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id)
    reply = bytearray(client.receive(server.receive(client.start())))
    reply[-1] ^= 1
    with pytest.raises(ChannelError, match="ClientFinished MAC mismatch"):
        server.receive(bytes(reply))
    with pytest.raises(ChannelError, match="already failed"):
        server.receive(b"")


def test_tampered_server_finished(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id)
    fin = bytearray(server.receive(client.receive(server.receive(client.start()))))
    fin[-1] ^= 1
    with pytest.raises(ChannelError, match="ServerFinished MAC mismatch"):
        client.receive(bytes(fin))
    assert client.result is None


def test_accept_migration_refuses(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    seen: list[tuple[bytes, str, int]] = []

    def accept(mid: bytes, client_name: str, n: int) -> None:
        seen.append((mid, client_name, n))
        raise LookupError("unknown migration id")

    client, server = make_pair(pki, src_id, dst_id, n_streams=2, s_accept_migration=accept)
    with pytest.raises(ChannelError, match="refused: unknown migration id"):
        server.receive(client.start())
    assert seen[0][1:] == (SRC, 2)


def test_client_expects_other_server(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    client, server = make_pair(pki, src_id, dst_id, server_name="elsewhere.example")
    with pytest.raises(ChannelError, match=r"client expects host 'elsewhere\.example'"):
        server.receive(client.start())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"migration_id": b"short"}, "migration_id must be 16 bytes"),
        ({"n_streams": 0}, "n_streams 0 out of range"),
        ({"n_streams": 300}, "n_streams 300 out of range"),
        ({"server_name": "bad name!"}, "invalid server name"),
        ({"cipher": "rot13"}, "unknown cipher 'rot13'"),
    ],
)
def test_client_bad_arguments(pki: Pki, src_id: LocalIdentity, kwargs: dict, message: str):
    from trustmig.channel import ClientHandshake

    args: dict[str, Any] = {
        "identity": src_id,
        "server_name": DST,
        "migration_id": bytes(16),
        "n_streams": 1,
        "verify_peer": pki.verifier(),
    }
    args.update(kwargs)
    with pytest.raises(ChannelError, match=message):
        ClientHandshake(**args)


def test_identity_key_mismatch(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    with pytest.raises(ChannelError, match="does not match the private key"):
        LocalIdentity(SRC, src_id.cert_der, dst_id.private_key)


def test_unexpected_message_and_huge_frame(pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity):
    _, server = make_pair(pki, src_id, dst_id)
    with pytest.raises(ChannelError, match="unexpected SERVER_FINISHED"):
        server.receive(FRAME_HEADER.pack(0, MsgType.SERVER_FINISHED))
    _, server = make_pair(pki, src_id, dst_id)
    with pytest.raises(ChannelError, match="announces 4294967295 bytes"):
        server.receive(b"\xff\xff\xff\xff\x01")


def test_exporter_agrees_on_both_ends_and_separates_purposes(
    pki: Pki, src_id: LocalIdentity, dst_id: LocalIdentity
):
    c, s = run_handshake(*make_pair(pki, src_id, dst_id))
    mid = c.migration_id
    assert c.session.exporter("disk keys", mid) == s.session.exporter("disk keys", mid)
    assert len(c.session.exporter("disk keys", mid)) == 32
    assert c.session.exporter("disk keys", mid) != c.session.exporter("other", mid)
    assert c.session.exporter("disk keys", mid) != c.session.exporter("disk keys", b"x" * 16)
    # another handshake of the same hosts exports something else
    c2, _ = run_handshake(*make_pair(pki, src_id, dst_id))
    assert c2.session.exporter("disk keys", mid) != c.session.exporter("disk keys", mid)
