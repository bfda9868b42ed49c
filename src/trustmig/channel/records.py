"""Record layer: AEAD-sealed records for one stream and one direction (see docs/protocol.md).

Wire format of a record::

    type u8 | flags u8 (0) | reserved u16 (0) | body_length u32 | ciphertext | tag (16)

The 8-byte header travels in clear and is authenticated as AAD together with the stream index,
direction and key epoch. The nonce is ``iv XOR sequence`` with a sequence number that is never
sent: any dropped, reordered, duplicated, replayed or spliced record decrypts under the wrong
nonce or key and fails authentication. ``seal_into``/``open_into`` encrypt and decrypt straight
between the caller's buffers (one pass, no intermediate copy of the payload).
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum

from cryptography.exceptions import InvalidTag

from trustmig.channel.errors import RecordError
from trustmig.channel.events import Aborted, Data, EndOfStream, Event, KeyUpdated
from trustmig.channel.keyschedule import (
    IV_SIZE,
    TAG_SIZE,
    TrafficKeys,
    direction_code,
    make_aead,
)
from trustmig.channel.limits import RecordLimits

HEADER = struct.Struct(">BBHI")
AAD_SUFFIX = struct.Struct(">4sIBI")  # "TMR1", stream, direction, epoch
AAD_MAGIC = b"TMR1"
KEY_UPDATE_BODY = struct.Struct(">I")
EOS_BODY = struct.Struct(">QQ32s")
MAX_ABORT_REASON = 1024
MAX_SEQUENCE = (1 << 64) - 1
_ZERO_DIGEST = bytes(32)


class RecordType(IntEnum):
    """Record types; anything else is rejected at the header."""

    DATA = 1
    KEY_UPDATE = 2
    END_OF_STREAM = 3
    ABORT = 4


KEY_UPDATE_RECORD_SIZE = HEADER.size + KEY_UPDATE_BODY.size + TAG_SIZE


def _nonce(iv_int: int, seq: int) -> bytes:
    return (iv_int ^ seq).to_bytes(IV_SIZE, "big")


class _Direction:
    """State shared by sealer and opener: keys of the current epoch, sequence, digest."""

    def __init__(
        self, *, cipher: str, secret: bytes, stream: int, direction: str, limits: RecordLimits
    ) -> None:
        self.cipher = cipher
        self.stream = stream
        self.direction = direction
        self._dir_code = direction_code(direction)
        self.limits = limits
        self._seq = 0
        self._digest = _ZERO_DIGEST
        self._install(TrafficKeys.from_secret(secret, 0))

    def _install(self, keys: TrafficKeys) -> None:
        self._keys = keys
        self._aead = make_aead(self.cipher, keys.key)
        self._iv = int.from_bytes(keys.iv, "big")
        self._aad_suffix = AAD_SUFFIX.pack(AAD_MAGIC, self.stream, self._dir_code, keys.epoch)
        self._epoch_bytes = 0
        self._epoch_records = 0

    @property
    def epoch(self) -> int:
        """Current key epoch (0 after the handshake)."""
        return self._keys.epoch

    @property
    def digest(self) -> bytes:
        """Running SHA-256 chain over the tags of every record so far (sent in end-of-stream)."""
        return self._digest

    def _chain(self, tag: bytes | memoryview) -> None:
        self._digest = hashlib.sha256(self._digest + bytes(tag)).digest()


class RecordSealer(_Direction):
    """Seals the records of one (stream, direction); obtain it from ``SessionKeys.sealer``."""

    HEADER_SIZE = HEADER.size
    TAG_SIZE = TAG_SIZE

    def __init__(
        self, *, cipher: str, secret: bytes, stream: int, direction: str, limits: RecordLimits
    ) -> None:
        super().__init__(
            cipher=cipher, secret=secret, stream=stream, direction=direction, limits=limits
        )
        self.bytes_sent = 0
        self.records_sent = 0
        self._ended = False

    def sealed_size(self, payload_length: int) -> int:
        """Bytes ``seal_into`` may write for a payload: one record plus room for a key update."""
        return HEADER.size + payload_length + TAG_SIZE + KEY_UPDATE_RECORD_SIZE

    def seal_into(
        self, payload: memoryview | bytes | bytearray, out: bytearray | memoryview
    ) -> int:
        """Write a DATA record (preceded by a KEY_UPDATE when the epoch is used up) into
        ``out``; return the number of bytes written. Size ``out`` with :meth:`sealed_size`."""
        n = len(payload)
        self._check_open()
        if n > self.limits.max_plaintext:
            raise RecordError(
                f"payload of {n} bytes exceeds the record limit of "
                f"{self.limits.max_plaintext}: split it",
                stream=self.stream,
                record=self._seq,
            )
        written = 0
        if self._epoch_records >= self.limits.rekey_records or (
            self._epoch_bytes > 0 and self._epoch_bytes + n > self.limits.rekey_bytes
        ):
            written = self._seal_record(
                RecordType.KEY_UPDATE, KEY_UPDATE_BODY.pack(self.epoch + 1), out, 0
            )
            self._install(self._keys.next_epoch())
        written += self._seal_record(RecordType.DATA, payload, out, written)
        self.bytes_sent += n
        self._epoch_bytes += n
        self._epoch_records += 1
        return written

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Convenience form of :meth:`seal_into` returning new bytes."""
        out = bytearray(self.sealed_size(len(payload)))
        n = self.seal_into(payload, out)
        return bytes(out[:n])

    def end_of_stream(self) -> bytes:
        """The final record: byte count, record count and tag digest of everything before it."""
        self._check_open()
        body = EOS_BODY.pack(self.bytes_sent, self.records_sent, self._digest)
        out = bytearray(HEADER.size + len(body) + TAG_SIZE)
        self._seal_record(RecordType.END_OF_STREAM, body, out, 0)
        self._ended = True
        return bytes(out)

    def abort(self, reason: str) -> bytes:
        """An authenticated ABORT record; the reason is truncated to 1024 UTF-8 bytes."""
        self._check_open()
        body = reason.encode("utf-8")[:MAX_ABORT_REASON].decode("utf-8", "ignore").encode()
        out = bytearray(HEADER.size + len(body) + TAG_SIZE)
        self._seal_record(RecordType.ABORT, body, out, 0)
        self._ended = True
        return bytes(out)

    def _check_open(self) -> None:
        if self._ended:
            raise RecordError(
                "stream already ended (end-of-stream or abort sent): open a new session",
                stream=self.stream,
                record=self._seq,
            )

    def _seal_record(
        self,
        rtype: RecordType,
        payload: memoryview | bytes | bytearray,
        out: bytearray | memoryview,
        offset: int,
    ) -> int:
        body_len = len(payload) + TAG_SIZE
        end = offset + HEADER.size + body_len
        if end > len(out):
            raise RecordError(
                f"output buffer of {len(out)} bytes too small, need {end}: "
                "size it with sealed_size()",
                stream=self.stream,
                record=self._seq,
            )
        if self._seq >= MAX_SEQUENCE:
            raise RecordError("sequence number exhausted", stream=self.stream, record=self._seq)
        view = memoryview(out)
        HEADER.pack_into(view, offset, rtype, 0, 0, body_len)
        aad = bytes(view[offset : offset + HEADER.size]) + self._aad_suffix
        self._aead.encrypt_into(
            _nonce(self._iv, self._seq), payload, aad, view[offset + HEADER.size : end]
        )
        self._chain(view[end - TAG_SIZE : end])
        self._seq += 1
        self.records_sent += 1
        return end - offset


class RecordOpener(_Direction):
    """Verifies and decrypts the records of one (stream, direction).

    After any error the opener is failed for good: a stream that saw tampering is never resumed.
    """

    HEADER_SIZE = HEADER.size
    TAG_SIZE = TAG_SIZE

    def __init__(
        self, *, cipher: str, secret: bytes, stream: int, direction: str, limits: RecordLimits
    ) -> None:
        super().__init__(
            cipher=cipher, secret=secret, stream=stream, direction=direction, limits=limits
        )
        self.bytes_received = 0
        self.records_received = 0
        self._finished: EndOfStream | None = None
        self._aborted: str | None = None
        self._failed: str | None = None
        self._buf = bytearray()

    @property
    def finished(self) -> bool:
        """True once a verified END_OF_STREAM arrived."""
        return self._finished is not None

    def _fail(self, message: str, *, record: int | None = None) -> RecordError:
        self._failed = message
        return RecordError(message, stream=self.stream, record=record)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RecordError(f"stream already failed ({self._failed})", stream=self.stream)
        if self._finished is not None or self._aborted is not None:
            raise self._fail("record after end-of-stream or abort", record=self._seq)

    def parse_header(self, header: bytes | bytearray | memoryview) -> int:
        """Validate a record header; return the body length (ciphertext + tag) to read next.

        Oversized or malformed headers are rejected here, before any body is read or buffered.
        """
        self._check_usable()
        if len(header) != HEADER.size:
            raise self._fail(
                f"record header must be {HEADER.size} bytes, got {len(header)}", record=self._seq
            )
        rtype, flags, reserved, body_len = HEADER.unpack(header)
        if flags != 0 or reserved != 0:
            raise self._fail("record header has non-zero flags/reserved bits", record=self._seq)
        if rtype == RecordType.DATA:
            limit = self.limits.max_plaintext
        elif rtype == RecordType.KEY_UPDATE:
            limit = KEY_UPDATE_BODY.size
        elif rtype == RecordType.END_OF_STREAM:
            limit = EOS_BODY.size
        elif rtype == RecordType.ABORT:
            limit = MAX_ABORT_REASON
        else:
            raise self._fail(f"unknown record type {rtype}", record=self._seq)
        if body_len < TAG_SIZE or body_len - TAG_SIZE > limit:
            raise self._fail(
                f"record length {body_len} out of range for type "
                f"{RecordType(rtype).name} (max {limit + TAG_SIZE})",
                record=self._seq,
            )
        return body_len

    def open_into(
        self,
        header: bytes | bytearray | memoryview,
        body: bytes | bytearray | memoryview,
        out: bytearray | memoryview,
    ) -> Event:
        """Authenticate and decrypt one record. DATA plaintext lands in ``out[:length]`` only
        after the tag verified (on failure that region is zeroed); control records are
        processed internally."""
        body_len = self.parse_header(header)
        seq = self._seq
        if len(body) != body_len:
            raise self._fail(
                f"record body is {len(body)} bytes, header announced {body_len}", record=seq
            )
        rtype = header[0]
        n = body_len - TAG_SIZE
        aad = bytes(header) + self._aad_suffix
        nonce = _nonce(self._iv, seq)
        if rtype == RecordType.DATA:
            if len(out) < n:
                raise RecordError(
                    f"output buffer of {len(out)} bytes too small for {n}", stream=self.stream
                )
            dest = memoryview(out)[:n]
            try:
                self._aead.decrypt_into(nonce, body, aad, dest)
            except InvalidTag:
                dest[:] = bytes(n)
                raise self._fail("authentication failed", record=seq) from None
            self._advance(body)
            self.bytes_received += n
            return Data(n)
        try:
            plain = self._aead.decrypt(nonce, bytes(body), aad)
        except InvalidTag:
            raise self._fail("authentication failed", record=seq) from None
        if rtype == RecordType.KEY_UPDATE:
            (epoch,) = KEY_UPDATE_BODY.unpack(plain) if len(plain) == 4 else (-1,)
            if epoch != self.epoch + 1:
                raise self._fail(
                    f"key update to epoch {epoch}, expected {self.epoch + 1}", record=seq
                )
            self._advance(body)
            self._install(self._keys.next_epoch())
            return KeyUpdated(epoch)
        if rtype == RecordType.END_OF_STREAM:
            if len(plain) != EOS_BODY.size:
                raise self._fail("malformed end-of-stream record", record=seq)
            total, records, digest = EOS_BODY.unpack(plain)
            if (total, records, digest) != (self.bytes_received, seq, self._digest):
                raise self._fail(
                    f"end-of-stream mismatch: peer sent {total} bytes in {records} records, "
                    f"received {self.bytes_received} bytes in {seq} records"
                    + ("" if digest == self._digest else ", record digest differs"),
                    record=seq,
                )
            self._advance(body)
            self._finished = EndOfStream(total, records)
            return self._finished
        reason = plain.decode("utf-8", "replace")
        self._advance(body)
        self._aborted = reason
        return Aborted(reason)

    def _advance(self, body: bytes | bytearray | memoryview) -> None:
        self._chain(memoryview(body)[-TAG_SIZE:])
        self._seq += 1
        self.records_received += 1

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Incremental parser for tests and fuzzing: returns events for every complete record;
        buffers at most one partial record (bounded by the record limit)."""
        self._check_failed()
        self._buf += data
        events: list[Event] = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= HEADER.size:
                header = bytes(buf[pos : pos + HEADER.size])
                body_len = self.parse_header(header)
                end = pos + HEADER.size + body_len
                if len(buf) < end:
                    break
                body = memoryview(buf)[pos + HEADER.size : end]
                out = bytearray(body_len - TAG_SIZE)
                try:
                    event = self.open_into(header, body, out)
                finally:
                    body.release()
                if isinstance(event, Data):
                    event = Data(event.length, bytes(out))
                events.append(event)
                pos = end
        finally:
            del buf[:pos]
        return events

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise RecordError(f"stream already failed ({self._failed})", stream=self.stream)

    def close(self) -> None:
        """Call at EOF. Raises unless a verified END_OF_STREAM ended the stream."""
        self._check_failed()
        if self._aborted is not None:
            raise self._fail(f"peer aborted: {self._aborted}")
        if self._finished is None:
            raise self._fail(
                "truncated: connection closed without end-of-stream after "
                f"{self.bytes_received} bytes",
                record=self._seq,
            )
        if self._buf:
            raise self._fail(f"{len(self._buf)} stray bytes after end-of-stream")
