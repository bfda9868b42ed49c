"""The lab report renderers: X.805 coverage, Markdown and self-contained HTML (no browser)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from trustmig.lab import x805
from trustmig.lab.report import (
    nice_ticks,
    render_html,
    render_markdown,
    target_state,
    write_reports,
)

from .sample_report import ATTACK_NAMES, sample_report

VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}
SVG_SELF_CLOSING = {"rect", "line", "circle", "path", "polyline"}


class TreeChecker(HTMLParser):
    """Checks that every non-void tag is closed in order, and records elements' attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None], tuple[str, ...]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), tuple(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), tuple(self.stack)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> TreeChecker:
    checker = TreeChecker()
    checker.feed(page)
    checker.close()
    return checker


def with_attack(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in report["attacks"] if a["name"] == name)


def cell_of(cov: dict[str, Any], dimension: str, layer: str, plane: str) -> dict[str, Any]:
    return next(
        c
        for c in cov["cells"]
        if (c["dimension"], c["layer"], c["plane"]) == (dimension, layer, plane)
    )


def declared_cells(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(e["dimension"], e["layer"], e["plane"]) for a in report["attacks"] for e in a["x805"]}


# --------------------------------------------------------------------------- X.805 model


def test_model_has_8_dimensions_3_layers_3_planes_in_order() -> None:
    assert list(x805.DIMENSIONS) == [
        "access_control",
        "authentication",
        "non_repudiation",
        "data_confidentiality",
        "communication_security",
        "data_integrity",
        "availability",
        "privacy",
    ]
    assert list(x805.LAYERS) == ["infrastructure", "services", "applications"]
    assert list(x805.PLANES) == ["management", "control", "end_user"]
    assert x805.PLANES["end_user"] == "End-user"
    assert len(x805.all_cells()) == len(set(x805.all_cells())) == 72


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        (("confidentiality", "infrastructure", "end_user"), "dimension 'confidentiality'"),
        (("privacy", "network", "end_user"), "layer 'network'"),
        (("privacy", "services", "data"), "plane 'data'"),
    ],
)
def test_invalid_cell_names_the_bad_value_and_the_allowed_ones(
    args: tuple[str, str, str], bad: str
) -> None:
    with pytest.raises(ValueError) as info:
        x805.cell(*args)
    message = str(info.value)
    assert bad in message
    assert "\n" not in message
    kind = bad.split()[0]
    allowed = {"dimension": x805.DIMENSIONS, "layer": x805.LAYERS, "plane": x805.PLANES}[kind]
    assert all(a in message for a in allowed)


def test_cell_accepts_display_spellings_but_cell_class_is_strict() -> None:
    c = x805.cell("Data confidentiality", "Infrastructure", "End-user")
    assert c == x805.Cell("data_confidentiality", "infrastructure", "end_user")
    with pytest.raises(ValueError, match="plane 'End-user'"):
        x805.Cell("data_confidentiality", "infrastructure", "End-user")


def test_coverage_of_sample_report() -> None:
    report = sample_report()
    cov = x805.coverage(report["attacks"])
    declared = declared_cells(report)
    assert cov["total"] == 72 == len(cov["cells"])
    assert cov["covered"] == len(declared) == 24
    assert cov["uncovered"] == 72 - len(declared)
    assert cov["breached"] == 0 and cov["protected"] == len(declared)
    for c in cov["cells"]:
        key = (c["dimension"], c["layer"], c["plane"])
        assert c["status"] == ("protected" if key in declared else "uncovered")
        assert bool(c["attacks"]) == (key in declared)
    shared = cell_of(cov, "communication_security", "infrastructure", "end_user")
    assert [a["name"] for a in shared["attacks"]] == ["eavesdrop", "memory_rewrite"]
    assert shared["attacks"][0] == {
        "name": "eavesdrop",
        "trustmig_compromised": False,
        "baseline_compromised": True,
    }


def test_a_breaching_attack_marks_all_its_cells_breached() -> None:
    report = sample_report()
    attack = with_attack(report, "memory_rewrite")
    attack["trustmig_compromised"] = True
    cov = x805.coverage(report["attacks"])
    for e in attack["x805"]:
        assert cell_of(cov, e["dimension"], e["layer"], e["plane"])["status"] == "breached"
    # eavesdrop alone still protects its other cells
    assert cell_of(cov, "privacy", "infrastructure", "end_user")["status"] == "protected"
    assert cov["breached"] == 3
    assert cov["covered"] == 24


def test_cells_covered_only_by_an_errored_attack_stay_uncovered() -> None:
    report = sample_report()
    attack = with_attack(report, "connection_abort")
    attack.update(error="proxy failed to bind", trustmig_compromised=None)
    attack["trustmig"]["compromised"] = None
    cov = x805.coverage(report["attacks"])
    only_abort = cell_of(cov, "availability", "applications", "end_user")
    assert only_abort["status"] == "uncovered"
    assert only_abort["attacks"][0]["trustmig_compromised"] is None
    # a cell the flood attack also covers keeps its verdict
    assert cell_of(cov, "availability", "infrastructure", "end_user")["status"] == "protected"


def test_coverage_rejects_an_invalid_cell_naming_the_attack() -> None:
    report = sample_report()
    with_attack(report, "flood")["x805"].append(
        {"dimension": "availabilty", "layer": "services", "plane": "control"}
    )
    with pytest.raises(ValueError, match=r"attack 'flood'.*dimension 'availabilty'.*availability"):
        x805.coverage(report["attacks"])
    with pytest.raises(ValueError, match="availabilty"):
        render_html(report)
    with pytest.raises(ValueError, match="availabilty"):
        render_markdown(report)


def test_coverage_rejects_an_entry_missing_a_key() -> None:
    report = sample_report()
    with_attack(report, "replay")["x805"].append({"dimension": "privacy", "layer": "services"})
    with pytest.raises(ValueError, match=r"attack 'replay'.*lacks.*plane"):
        x805.coverage(report["attacks"])


def test_duplicate_cells_in_one_attack_count_once() -> None:
    report = sample_report()
    attack = with_attack(report, "eavesdrop")
    attack["x805"].append(dict(attack["x805"][0]))
    cov = x805.coverage(report["attacks"])
    first = attack["x805"][0]
    cell = cell_of(cov, first["dimension"], first["layer"], first["plane"])
    assert [a["name"] for a in cell["attacks"]] == ["eavesdrop"]


# --------------------------------------------------------------------------- Markdown


def test_markdown_lists_every_attack_and_the_matrix() -> None:
    md = render_markdown(sample_report())
    assert md.startswith("# trustmig attack lab report\n")
    assert "9 attacks · baseline compromised by 8 · trustmig compromised by 0" in md
    for name in ATTACK_NAMES:
        assert f"`{name}`" in md
    assert "| Attack | Baseline outcome | trustmig outcome | Evidence (short) " in md
    matrix_header = next(line for line in md.splitlines() if line.startswith("| Dimension |"))
    assert matrix_header.count("|") == 11
    assert "Infrastructure / End-user" in matrix_header
    for name in x805.DIMENSIONS.values():
        assert any(line.startswith(f"| {name} |") for line in md.splitlines())
    assert "| Communication security | · | · | ✔ eavesdrop, memory_rewrite |" in md
    assert "Uncovered cells: 48 of 72." in md


def test_summary_is_recomputed_from_the_attacks() -> None:
    report = sample_report()
    with_attack(report, "flood")["trustmig_compromised"] = True
    report["summary"] = {"attacks": 99, "trustmig_compromised": 0}  # stale / hand-edited
    md = render_markdown(report)
    assert "9 attacks · baseline compromised by 8 · trustmig compromised by 1 · 0 errors" in md


def test_markdown_marks_breaches_and_escapes_pipes() -> None:
    report = sample_report()
    attack = with_attack(report, "flood")
    attack["trustmig_compromised"] = True
    attack["trustmig"].update(compromised=True, outcome="stalled | aborted")
    md = render_markdown(report)
    assert "✘ flood" in md
    assert "✘ **compromised**: stalled \\| aborted" in md
    row = next(line for line in md.splitlines() if line.startswith("| `flood`"))
    assert row.replace("\\|", "").count("|") == 6


def test_markdown_shows_errored_attack_as_error() -> None:
    report = sample_report()
    attack = with_attack(report, "malformed_stream")
    attack.update(error="guest image missing", baseline_compromised=None)
    attack.update(trustmig_compromised=None, baseline=None, trustmig=None)
    md = render_markdown(report)
    row = next(line for line in md.splitlines() if line.startswith("| `malformed_stream`"))
    assert row.count("⚠ error: guest image missing") == 2
    assert "the attack failed to run: guest image missing" in md


# --------------------------------------------------------------------------- HTML


def test_html_is_balanced_and_has_the_stable_ids() -> None:
    page = render_html(sample_report())
    tree = parse(page)
    assert tree.errors == []
    assert tree.stack == []
    ids = {attrs.get("id") for _, attrs, _ in tree.elements}
    assert {"summary", "attack-matrix", "x805-matrix", "chart"} <= ids
    statuses = [a["data-status"] for _, a, _ in tree.elements if "data-status" in a]
    assert len(statuses) == 72
    assert set(statuses) == {"protected", "uncovered"}
    rows = [a["data-attack"] for tag, a, _ in tree.elements if tag == "tr" and "data-attack" in a]
    assert rows == list(ATTACK_NAMES)
    for tag in ("table", "tr", "td", "th", "svg"):
        assert len(re.findall(rf"<{tag}[\s>]", page)) == page.count(f"</{tag}>") > 0, tag


def test_html_is_self_contained() -> None:
    page = render_html(sample_report())
    without_xmlns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count('xmlns="http://www.w3.org/2000/svg"') == 1
    assert "http://" not in without_xmlns and "https://" not in without_xmlns
    lowered = page.lower()
    for needle in ("<script", "<link", " src=", "url(", "@import"):
        assert needle not in lowered, needle


def test_html_x805_cells_have_status_and_attack_names() -> None:
    report = sample_report()
    with_attack(report, "replay")["trustmig_compromised"] = True
    tree = parse(render_html(report))
    cells = {
        (a["data-dimension"], a["data-layer"], a["data-plane"]): a["data-status"]
        for tag, a, _ in tree.elements
        if tag == "td" and "data-status" in a
    }
    assert cells[("data_integrity", "services", "control")] == "breached"
    assert cells[("privacy", "infrastructure", "end_user")] == "protected"
    assert cells[("privacy", "applications", "control")] == "uncovered"
    assert "".join(tree.text).count("replay") >= 4  # 3 X.805 cells + matrix row + table


def test_html_escapes_attack_supplied_text() -> None:
    report = sample_report()
    attack = with_attack(report, "eavesdrop")
    attack["baseline"]["evidence"] = {"dump": "<script>alert('x')</script>"}
    attack["trustmig"]["outcome"] = '<img src=x onerror="alert(1)">'
    attack["name"] = 'eaves"drop<b>'
    page = render_html(report)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "<img" not in page
    assert 'data-attack="eaves&quot;drop&lt;b&gt;"' in page
    assert parse(page).errors == []


def test_html_renders_an_errored_attack_as_error() -> None:
    report = sample_report()
    attack = with_attack(report, "rogue_destination")
    attack.update(error="could not start rogue host <qemu>", baseline_compromised=None)
    attack.update(trustmig_compromised=None)
    attack["baseline"] = {"compromised": None}
    del attack["trustmig"]
    assert target_state(attack, "baseline") == target_state(attack, "trustmig") == "error"
    tree = parse(render_html(report))
    assert tree.errors == []
    row_cells = [
        a.get("class")
        for tag, a, stack in tree.elements
        if tag == "td" and a.get("data-target") and "tr" in stack
    ]
    # attack-matrix cells in row order: rogue_destination is the 5th attack
    assert row_cells[8:10] == ["state error", "state error"]
    assert "could not start rogue host &lt;qemu&gt;" in render_html(report)


def test_not_run_without_error() -> None:
    attack = {"name": "x", "x805": []}
    assert target_state(attack, "baseline") == "not run"


def test_missing_optional_keys_render_and_chart_falls_back_to_counts() -> None:
    report = sample_report()
    del report["summary"], report["platform"], report["started"], report["duration_s"]
    for a in report["attacks"]:
        for key in ("paper", "error", "title"):
            a.pop(key, None)
        for target in ("baseline", "trustmig"):
            for key in ("evidence", "guest", "duration_s", "outcome"):
                a[target].pop(key)
    page = render_html(report)
    md = render_markdown(report)
    assert parse(page).errors == []
    assert "Number of attacks" in page and "Duration (s)" not in page
    assert "9 attacks · baseline compromised by 8 · trustmig compromised by 0" in md
    assert "9 attacks · baseline compromised by 8" in page


def test_chart_has_axis_labels_legend_and_a_bar_pair_per_attack() -> None:
    page = render_html(sample_report())
    svg = page[page.index('<svg id="chart"') : page.index("</svg>")]
    assert "Duration (s)" in svg and ">Attack<" in svg
    assert "Baseline (QEMU TCP)" in svg and ">trustmig<" in svg
    assert svg.count("<rect") == 2 * len(ATTACK_NAMES) + 2  # bars + legend swatches
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="[\d.]+" width="([\d.]+)"', svg)]
    assert max(widths) > 0


def test_nice_ticks() -> None:
    assert nice_ticks(61.0) == [0, 20, 40, 60, 80]
    assert nice_ticks(0.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(5.0)[-1] >= 5.0


def test_write_reports_writes_html_and_markdown_side_by_side(tmp_path: Path) -> None:
    html_path, md_path = write_reports(sample_report(), tmp_path / "out" / "lab-report.html")
    assert html_path == tmp_path / "out" / "lab-report.html"
    assert md_path == tmp_path / "out" / "lab-report.md"
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert md_path.read_text(encoding="utf-8").startswith("# trustmig attack lab report")
    with pytest.raises(ValueError, match=r"\.md"):
        write_reports(sample_report(), tmp_path / "x.md")
