"""The HTML report in a real browser: headless Chromium renders it, its DOM and pixels are checked.

Parsing our own HTML in Python cannot tell whether a browser shows a usable page, so this test
loads the file in Debian's Chromium (installed by scripts/bootstrap), dumps the DOM it built and
takes a screenshot, then decodes the PNG with the standard library only (struct + zlib) to make
sure the page is not blank and shows the red/green outcome badges.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from trustmig.lab.report import GREEN, RED, write_reports

from .sample_report import ATTACK_NAMES, sample_report

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1400, 2200
TIMEOUT_S = 60
COLOUR_TOLERANCE = 10
MIN_BADGE_PIXELS = 1000


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed (neither `chromium` nor `chromium-browser` is on PATH); "
        "run `make test` or scripts/bootstrap, which install it"
    )


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium as root-safe; stderr (dbus noise etc.) is captured and ignored."""
    cmd = [
        chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture
def report_html(tmp_path: Path) -> Path:
    html_path, _ = write_reports(sample_report(), tmp_path / "lab-report.html")
    return html_path


# --------------------------------------------------------------------------- DOM


class DomScan(HTMLParser):
    """Collects attributes of <td data-status> / <tr data-attack> by the id of their table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.depth: list[int] = []
        self.level = 0
        self.statuses: dict[str, list[str]] = {}
        self.attack_rows: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "meta":
            return
        self.level += 1
        if tag == "table":
            self.tables.append(a.get("id") or "")
            self.depth.append(self.level)
        table = self.tables[-1] if self.tables else ""
        if tag == "td" and a.get("data-status"):
            self.statuses.setdefault(table, []).append(a["data-status"] or "")
        if tag == "tr" and a.get("data-attack"):
            self.attack_rows.setdefault(table, []).append(a["data-attack"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "meta":
            return
        if tag == "table" and self.depth and self.depth[-1] == self.level:
            self.tables.pop()
            self.depth.pop()
        self.level -= 1


def test_dom_has_x805_matrix_and_attack_matrix(tmp_path: Path, report_html: Path) -> None:
    proc = run_chromium(tmp_path, "--dump-dom", report_html.as_uri())
    dom = proc.stdout
    assert 'id="x805-matrix"' in dom and 'id="attack-matrix"' in dom and 'id="chart"' in dom
    scan = DomScan()
    scan.feed(dom)
    statuses = scan.statuses.get("x805-matrix", [])
    assert len(statuses) == 72
    assert set(statuses) <= {"protected", "breached", "uncovered"}
    assert statuses.count("protected") == 24
    assert scan.attack_rows.get("attack-matrix") == list(ATTACK_NAMES)


# --------------------------------------------------------------------------- PNG


def png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        yield kind, data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def png_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk."""
    kind, body = next(png_chunks(data))
    assert kind == b"IHDR"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
    return width, height, depth, colour, interlace


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def unfilter_row(ftype: int, row: bytearray, prev: bytes, bpp: int) -> bytearray:
    """Undo one PNG scanline filter (types 0-4) in place and return the row."""
    n = len(row)
    if ftype == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif ftype == 2:
        for i in range(n):
            row[i] = (row[i] + prev[i]) & 0xFF
    elif ftype == 3:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif ftype == 4:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            upleft = prev[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + _paeth(left, prev[i], upleft)) & 0xFF
    else:
        assert ftype == 0, f"unknown PNG filter type {ftype}"
    return row


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG into (width, bytes per pixel, rows)."""
    width, height, depth, colour, interlace = png_header(data)
    assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(body for kind, body in png_chunks(data) if kind == b"IDAT"))
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    prev = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = unfilter_row(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), prev, bpp)
        prev = bytes(row)
        rows.append(prev)
    return width, bpp, rows


def colour_histogram(width: int, bpp: int, rows: list[bytes]) -> Counter[tuple[int, int, int]]:
    """Pixel count per RGB colour (alpha ignored)."""
    counts: Counter[bytes] = Counter()
    for row in rows:
        counts.update(row[i : i + 3] for i in range(0, width * bpp, bpp))
    return Counter({(c[0], c[1], c[2]): n for c, n in counts.items()})


def rgb(hex_colour: str) -> tuple[int, int, int]:
    value = int(hex_colour.lstrip("#"), 16)
    return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


def pixels_near(histogram: Counter[tuple[int, int, int]], want: tuple[int, int, int]) -> int:
    """How many pixels are within COLOUR_TOLERANCE of ``want`` on every channel."""
    return sum(
        n
        for c, n in histogram.items()
        if all(abs(a - b) <= COLOUR_TOLERANCE for a, b in zip(c, want, strict=True))
    )


def test_unfilter_handles_all_filter_types() -> None:
    prev = bytes([10, 20, 30, 40, 50, 60])
    assert unfilter_row(0, bytearray([1, 2, 3, 4, 5, 6]), prev, 3) == bytearray([1, 2, 3, 4, 5, 6])
    assert unfilter_row(1, bytearray([1, 2, 3, 4, 5, 6]), prev, 3) == bytearray([1, 2, 3, 5, 7, 9])
    assert unfilter_row(2, bytearray([1, 2, 3, 250, 5, 6]), prev, 3) == bytearray(
        [11, 22, 33, 34, 55, 66]
    )
    assert unfilter_row(3, bytearray([1, 2, 3, 4, 5, 6]), prev, 3) == bytearray(
        [6, 12, 18, 27, 36, 45]
    )
    # Paeth with a=left, b=up, c=up-left: first pixel has a=c=0 so predicts b (up)
    assert unfilter_row(4, bytearray([1, 2, 3, 0, 0, 0]), prev, 3) == bytearray(
        [11, 22, 33, 40, 50, 60]
    )


def test_screenshot_shows_the_report(tmp_path: Path, report_html: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(
        tmp_path,
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={shot}",
        report_html.as_uri(),
    )
    assert shot.is_file() and shot.stat().st_size > 0
    data = shot.read_bytes()
    assert png_header(data)[:2] == (WIDTH, HEIGHT)
    width, bpp, rows = png_pixels(data)
    histogram = colour_histogram(width, bpp, rows)
    assert len(histogram) > 5, f"screenshot looks blank: {histogram.most_common(5)}"
    # solid badge / matrix areas, not a few anti-aliased pixels that happen to be close
    assert pixels_near(histogram, rgb(RED)) > MIN_BADGE_PIXELS, "no red 'compromised' badges"
    assert pixels_near(histogram, rgb(GREEN)) > MIN_BADGE_PIXELS, "no green 'blocked' badges"
