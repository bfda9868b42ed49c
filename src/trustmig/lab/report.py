"""Render the attack lab's result dict as Markdown and as one self-contained HTML page.

The lab's value is the comparison: the same attacks from the survey paper against unprotected
QEMU migration (the baseline) and against trustmig, laid out on the ITU-T X.805 architecture so
that both what is protected *and* what no attack has tested yet are visible. The renderers are
pure functions of the report dict (no VMs, no I/O except :func:`write_reports`) so they can be
unit-tested and re-run on a saved report. The HTML page has inline CSS and SVG only: it must open
from a file on an air-gapped host, and attack-supplied evidence is always escaped.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from trustmig.lab.x805 import COLUMNS, DIMENSIONS, LAYERS, PLANES, coverage, outcome

TARGETS: Final[tuple[str, str]] = ("baseline", "trustmig")
TARGET_LABELS: Final[Mapping[str, str]] = {
    "baseline": "Baseline (QEMU TCP)",
    "trustmig": "trustmig",
}

RED: Final = "#c62828"
"""Badge colour of a compromised target (also asserted on by the browser test)."""
GREEN: Final = "#2e7d32"
"""Badge colour of a target that blocked the attack."""
GREY: Final = "#757575"
"""Badge colour of an attack that errored or did not run."""
SERIES_COLOURS: Final[Mapping[str, str]] = {"baseline": "#ef6c00", "trustmig": "#1565c0"}

State = Literal["compromised", "blocked", "error", "not run"]
STATE_COLOURS: Final[Mapping[str, str]] = {
    "compromised": RED,
    "blocked": GREEN,
    "error": GREY,
    "not run": GREY,
}
MD_STATE: Final[Mapping[str, str]] = {
    "compromised": "✘ **compromised**",
    "blocked": "✔ blocked",
    "error": "⚠ error",
    "not run": "- not run",
}
CELL_MARKS: Final[Mapping[str, str]] = {"protected": "✔", "breached": "✘", "uncovered": "·"}
EVIDENCE_CHARS: Final = 80


# --------------------------------------------------------------------------- shared helpers


def _attacks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    attacks = report.get("attacks") or []
    return [a for a in attacks if isinstance(a, dict)]


def _result(attack: Mapping[str, Any], target: str) -> Mapping[str, Any]:
    value = attack.get(target)
    return value if isinstance(value, Mapping) else {}


def target_state(attack: Mapping[str, Any], target: str) -> State:
    """What happened to ``target``: compromised, blocked, or (no verdict) error / not run."""
    verdict = outcome(attack, target)
    if verdict is True:
        return "compromised"
    if verdict is False:
        return "blocked"
    return "error" if attack.get("error") else "not run"


def _outcome_line(attack: Mapping[str, Any], target: str) -> str:
    line = _result(attack, target).get("outcome")
    if isinstance(line, str) and line:
        return line
    error = attack.get("error")
    return str(error) if error and outcome(attack, target) is None else ""


def _duration(attack: Mapping[str, Any], target: str) -> float | None:
    value = _result(attack, target).get("duration_s")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _shorten(text: str, limit: int = EVIDENCE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _evidence_json(evidence: Any, indent: int | None = None) -> str:
    if isinstance(evidence, str):
        return evidence
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(evidence, sort_keys=True, indent=indent, separators=separators, default=str)


def evidence_short(attack: Mapping[str, Any]) -> str:
    """One line of evidence per target that has some, e.g. ``baseline: {"hits":3}``."""
    parts = []
    for target in TARGETS:
        evidence = _result(attack, target).get("evidence")
        if evidence not in (None, {}, [], ""):
            parts.append(f"{target}: {_shorten(_evidence_json(evidence))}")
    return "; ".join(parts)


def guest_text(guest: Any) -> str:
    """Human summary of a result's ``guest`` dict (missing keys are left out)."""
    if not isinstance(guest, Mapping) or not guest:
        return ""
    parts = []
    copies = guest.get("running_copies")
    if isinstance(copies, int):
        where = guest.get("where")
        noun = "running copy" if copies == 1 else "running copies"
        parts.append(f"{copies} {noun}" + (f" ({where})" if where else ""))
    if isinstance(guest.get("memory_intact"), bool):
        parts.append("memory intact" if guest["memory_intact"] else "memory ALTERED")
    if isinstance(guest.get("heartbeat_continued"), bool):
        parts.append("heartbeat continued" if guest["heartbeat_continued"] else "heartbeat stopped")
    return ", ".join(parts)


def summarise(report: Mapping[str, Any]) -> dict[str, int]:
    """Summary counts computed from the attack list.

    The runner's own ``summary`` is deliberately not used: recomputing keeps the headline
    consistent with the tables below it even if a report was edited or assembled by hand.
    """
    attacks = _attacks(report)
    return {
        "attacks": len(attacks),
        "baseline_compromised": sum(outcome(a, "baseline") is True for a in attacks),
        "trustmig_compromised": sum(outcome(a, "trustmig") is True for a in attacks),
        "errors": sum(bool(a.get("error")) for a in attacks),
    }


def _platform_text(report: Mapping[str, Any]) -> str:
    platform = report.get("platform")
    if not isinstance(platform, Mapping):
        return ""
    labels = (("accel", "accel"), ("qemu", "QEMU"), ("host", "host"))
    return ", ".join(f"{label} {platform[k]}" for k, label in labels if platform.get(k))


def _meta_text(report: Mapping[str, Any]) -> str:
    parts = []
    if report.get("started"):
        parts.append(f"started {report['started']}")
    duration = report.get("duration_s")
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        parts.append(f"duration {duration:.1f} s")
    platform = _platform_text(report)
    if platform:
        parts.append(f"platform: {platform}")
    return " · ".join(parts)


def _summary_text(report: Mapping[str, Any], cov: Mapping[str, Any]) -> str:
    s = summarise(report)
    return (
        f"{s['attacks']} attacks · baseline compromised by {s['baseline_compromised']} · "
        f"trustmig compromised by {s['trustmig_compromised']} · {s['errors']} errors · "
        f"X.805 cells covered {cov['covered']}/{cov['total']} "
        f"({cov['protected']} protected, {cov['breached']} breached)"
    )


def _column_label(layer: str, plane: str) -> str:
    return f"{LAYERS[layer]} / {PLANES[plane]}"


def _cells_by_dimension(cov: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {d: [] for d in DIMENSIONS}
    for c in cov["cells"]:
        rows[c["dimension"]].append(c)
    return rows


# --------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """Make text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _md_outcome(attack: Mapping[str, Any], target: str) -> str:
    line = _outcome_line(attack, target)
    return MD_STATE[target_state(attack, target)] + (f": {_md(line)}" if line else "")


def _md_attack_table(attacks: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| Attack | Baseline outcome | trustmig outcome | Evidence (short) "
        "| Guest after (trustmig) |",
        "|---|---|---|---|---|",
    ]
    for a in attacks:
        name = f"`{_md(a.get('name', '?'))}`" + (f" — {_md(a['title'])}" if a.get("title") else "")
        guest = guest_text(_result(a, "trustmig").get("guest"))
        cells = [name, _md_outcome(a, "baseline"), _md_outcome(a, "trustmig")]
        cells += [_md(evidence_short(a)), _md(guest)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _md_threats(attacks: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for a in attacks:
        head = f"- **{_md(a.get('name', '?'))}**"
        if a.get("title"):
            head += f" — {_md(a['title'])}"
        if a.get("paper"):
            head += f": {' '.join(str(a['paper']).split())}"
        lines.append(head)
        if a.get("error"):
            lines.append(f"  - ⚠ the attack failed to run: {' '.join(str(a['error']).split())}")
    return lines


def _md_cell(c: Mapping[str, Any]) -> str:
    names = ", ".join(_md(a["name"]) for a in c["attacks"])
    return CELL_MARKS[c["status"]] + (f" {names}" if names else "")


def _md_matrix(cov: Mapping[str, Any]) -> list[str]:
    header = "| Dimension | " + " | ".join(_column_label(lay, pl) for lay, pl in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for dim, cells in _cells_by_dimension(cov).items():
        lines.append(f"| {DIMENSIONS[dim]} | " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def _md_uncovered(cov: Mapping[str, Any]) -> list[str]:
    lines = [f"Uncovered cells: {cov['uncovered']} of {cov['total']}.", ""]
    for dim, cells in _cells_by_dimension(cov).items():
        gaps = [_column_label(c["layer"], c["plane"]) for c in cells if c["status"] == "uncovered"]
        if gaps:
            lines.append(f"- {DIMENSIONS[dim]} ({len(gaps)}): {', '.join(gaps)}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown. Raises ValueError on an unknown X.805 cell."""
    attacks = _attacks(report)
    cov = coverage(attacks)
    meta = _meta_text(report)
    lines = ["# trustmig attack lab report", ""]
    lines += [f"_{meta}_", ""] if meta else []
    lines += [f"**Summary:** {_summary_text(report, cov)}", ""]
    lines += ["## Attacks vs targets", "", *_md_attack_table(attacks), ""]
    lines += ["## Threats (from the survey paper)", "", *_md_threats(attacks), ""]
    lines += ["## ITU-T X.805 matrix (trustmig)", ""]
    lines += ["Legend: ✔ protected · ✘ breached · `·` uncovered (no attack ran against it)", ""]
    lines += [*_md_matrix(cov), "", *_md_uncovered(cov)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


CSS: Final = f"""
body {{ font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #212121;
  background: #fff; font-size: 14px; }}
h1 {{ margin: 0 0 4px 0; font-size: 24px; }}
h2 {{ margin: 28px 0 8px 0; font-size: 18px; border-bottom: 1px solid #ddd; }}
.meta {{ color: #616161; margin: 0 0 8px 0; }}
.stats {{ list-style: none; padding: 0; margin: 8px 0; display: flex; gap: 12px; }}
.stats li {{ border: 1px solid #ddd; border-radius: 6px; padding: 6px 12px; }}
.stats b {{ font-size: 20px; display: block; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
th {{ background: #f0f0f0; }}
.badge {{ display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff;
  font-weight: bold; font-size: 12px; }}
.compromised {{ background: {RED}; }}
.blocked {{ background: {GREEN}; }}
.error, .not-run {{ background: {GREY}; }}
#attack-matrix td.state {{ color: #fff; font-weight: bold; text-align: center; min-width: 140px; }}
.small {{ color: #616161; font-size: 12px; }}
.evidence {{ font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }}
pre {{ margin: 4px 0; white-space: pre-wrap; max-width: 420px; }}
#x805-matrix td {{ font-size: 12px; min-width: 92px; }}
#x805-matrix td[data-status="protected"] {{ background: #c8e6c9; }}
#x805-matrix td[data-status="breached"] {{ background: #ffcdd2; }}
#x805-matrix td[data-status="uncovered"] {{ background: #f5f5f5; color: #9e9e9e; }}
#x805-matrix .hit {{ color: {RED}; font-weight: bold; }}
#x805-matrix .norun {{ color: #9e9e9e; text-decoration: line-through; }}
.legend span {{ display: inline-block; padding: 2px 8px; margin-right: 8px; }}
"""


def _badge(state: State) -> str:
    return f'<span class="badge {state.replace(" ", "-")}">{_e(state)}</span>'


def _html_header(report: Mapping[str, Any], cov: Mapping[str, Any]) -> str:
    s = summarise(report)
    stats = [
        ("attacks", s["attacks"]),
        ("baseline compromised", s["baseline_compromised"]),
        ("trustmig compromised", s["trustmig_compromised"]),
        ("errors", s["errors"]),
        ("X.805 cells covered", f"{cov['covered']}/{cov['total']}"),
    ]
    items = "".join(f"<li><b>{_e(v)}</b>{_e(k)}</li>" for k, v in stats)
    return (
        '<header id="summary"><h1>trustmig attack lab report</h1>'
        f'<p class="meta">{_e(_meta_text(report))}</p>'
        f'<p>{_e(_summary_text(report, cov))}</p><ul class="stats">{items}</ul></header>'
    )


def _html_attack_matrix(attacks: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(TARGET_LABELS[t])}</th>" for t in TARGETS)
    rows = []
    for a in attacks:
        name = str(a.get("name", "?"))
        tds = "".join(
            f'<td class="state {target_state(a, t).replace(" ", "-")}" data-target="{t}">'
            f"{_e(target_state(a, t))}</td>"
            for t in TARGETS
        )
        rows.append(f'<tr data-attack="{_e(name)}"><th>{_e(name)}</th>{tds}</tr>')
    return (
        '<section><h2>Outcome matrix: attack &times; target</h2><table id="attack-matrix">'
        f"<thead><tr><th>Attack</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table></section>"
    )


def _html_outcome_cell(attack: Mapping[str, Any], target: str) -> str:
    line = _outcome_line(attack, target)
    duration = _duration(attack, target)
    extra = f'<div class="small">{duration:.1f} s</div>' if duration is not None else ""
    return f"<td>{_badge(target_state(attack, target))} {_e(line)}{extra}</td>"


def _html_evidence_cell(attack: Mapping[str, Any]) -> str:
    details = []
    for target in TARGETS:
        evidence = _result(attack, target).get("evidence")
        if evidence not in (None, {}, [], ""):
            details.append(
                f"<details><summary>{_e(target)}</summary>"
                f"<pre>{_e(_evidence_json(evidence, indent=2))}</pre></details>"
            )
    short = _e(evidence_short(attack))
    return f'<td class="evidence"><div>{short}</div>{"".join(details)}</td>'


def _html_attack_cell(attack: Mapping[str, Any]) -> str:
    parts = [f"<b>{_e(attack.get('name', '?'))}</b>"]
    if attack.get("title"):
        parts.append(f"<div>{_e(attack['title'])}</div>")
    if attack.get("paper"):
        parts.append(f'<div class="small">{_e(attack["paper"])}</div>')
    if attack.get("error"):
        parts.append(f'<div class="small">{_badge("error")} {_e(attack["error"])}</div>')
    return f"<td>{''.join(parts)}</td>"


def _html_attack_table(attacks: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("Attack", "Baseline outcome", "trustmig outcome", "Evidence", "Guest after")
    )
    rows = []
    for a in attacks:
        guest = guest_text(_result(a, "trustmig").get("guest"))
        rows.append(
            f'<tr id="attack-{_e(a.get("name", "?"))}">{_html_attack_cell(a)}'
            f"{_html_outcome_cell(a, 'baseline')}{_html_outcome_cell(a, 'trustmig')}"
            f"{_html_evidence_cell(a)}<td>{_e(guest)}</td></tr>"
        )
    return (
        '<section><h2>Attacks in detail</h2><table id="attack-table">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _html_x805_cell(c: Mapping[str, Any]) -> str:
    names = []
    for a in c["attacks"]:
        verdict = a["trustmig_compromised"]
        cls = "hit" if verdict is True else "norun" if verdict is None else "ok"
        names.append(f'<div class="{cls}">{_e(a["name"])}</div>')
    status = c["status"]
    title = f"{DIMENSIONS[c['dimension']]} / {_column_label(c['layer'], c['plane'])}: {status}"
    return (
        f'<td data-status="{status}" data-dimension="{c["dimension"]}" '
        f'data-layer="{c["layer"]}" data-plane="{c["plane"]}" title="{_e(title)}">'
        f"{CELL_MARKS[status]}{''.join(names)}</td>"
    )


def _html_x805_head() -> str:
    layers = "".join(f'<th colspan="{len(PLANES)}">{_e(name)}</th>' for name in LAYERS.values())
    planes = "".join(f"<th>{_e(PLANES[pl])}</th>" for _, pl in COLUMNS)
    return f'<thead><tr><th rowspan="2">Dimension</th>{layers}</tr><tr>{planes}</tr></thead>'


def _html_x805(cov: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr data-dimension="{dim}"><th>{_e(DIMENSIONS[dim])}</th>'
        f"{''.join(_html_x805_cell(c) for c in cells)}</tr>"
        for dim, cells in _cells_by_dimension(cov).items()
    )
    legend = (
        '<p class="legend"><span style="background:#c8e6c9">✔ protected</span>'
        '<span style="background:#ffcdd2">✘ breached</span>'
        '<span style="background:#f5f5f5">· uncovered</span>'
        '<span class="small">struck-through names: attack did not run</span></p>'
    )
    return (
        "<section><h2>ITU-T X.805 matrix (trustmig)</h2>"
        f'{legend}<table id="x805-matrix">{_html_x805_head()}<tbody>{rows}</tbody></table>'
        f"<p>Uncovered cells: {cov['uncovered']} of {cov['total']}.</p></section>"
    )


# --------------------------------------------------------------------------- SVG chart

Series = tuple[str, str]  # (label, colour)
Group = tuple[str, list[float | None]]  # (label, one value per series)

BAR_H: Final = 12
GROUP_GAP: Final = 10
LABEL_W: Final = 190
PLOT_W: Final = 640
TOP: Final = 40
BOTTOM: Final = 52


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``maximum`` (1-2-5 steps)."""
    maximum = maximum if maximum > 0 else 1.0
    raw = maximum / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    n = math.ceil(maximum / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _svg_axis(ticks: list[float], plot_h: float, axis_label: str) -> str:
    scale = PLOT_W / ticks[-1]
    parts = []
    for t in ticks:
        x = LABEL_W + t * scale
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#e0e0e0"/>'
            f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{t:g}</text>'
        )
    parts.append(
        f'<line x1="{LABEL_W}" y1="{TOP + plot_h}" x2="{LABEL_W + PLOT_W}" '
        f'y2="{TOP + plot_h}" stroke="#424242"/>'
        f'<text x="{LABEL_W + PLOT_W / 2}" y="{TOP + plot_h + 40}" text-anchor="middle" '
        f'font-size="12">{_e(axis_label)}</text>'
    )
    return "".join(parts)


def _svg_group(index: int, group: Group, series: Sequence[Series], scale: float) -> str:
    label, values = group
    y0 = TOP + index * (len(series) * BAR_H + GROUP_GAP) + GROUP_GAP / 2
    mid = y0 + len(series) * BAR_H / 2
    parts = [
        f'<text x="{LABEL_W - 8}" y="{mid + 4:.1f}" text-anchor="end" font-size="12">'
        f"{_e(label)}</text>"
    ]
    for i, ((_, colour), value) in enumerate(zip(series, values, strict=True)):
        y = y0 + i * BAR_H
        text = "n/a" if value is None else f"{value:g}"
        width = 0.0 if value is None else value * scale
        parts.append(
            f'<rect x="{LABEL_W}" y="{y:.1f}" width="{width:.1f}" height="{BAR_H - 2}" '
            f'fill="{colour}"/><text x="{LABEL_W + width + 4:.1f}" y="{y + BAR_H - 4:.1f}" '
            f'font-size="10">{_e(text)}</text>'
        )
    return "".join(parts)


def _svg_legend(series: Sequence[Series]) -> str:
    parts = []
    for i, (label, colour) in enumerate(series):
        x = LABEL_W + i * 170
        parts.append(
            f'<rect x="{x}" y="12" width="14" height="14" fill="{colour}"/>'
            f'<text x="{x + 20}" y="24" font-size="12">{_e(label)}</text>'
        )
    return "".join(parts)


def bar_chart_svg(
    groups: Sequence[Group], series: Sequence[Series], axis_label: str, y_label: str, title: str
) -> str:
    """A grouped horizontal bar chart as a standalone inline ``<svg id="chart">``."""
    values = [v for _, vs in groups for v in vs if v is not None]
    ticks = nice_ticks(max(values, default=0.0))
    plot_h = len(groups) * (len(series) * BAR_H + GROUP_GAP)
    height = TOP + plot_h + BOTTOM
    width = LABEL_W + PLOT_W + 60
    bars = "".join(_svg_group(i, g, series, PLOT_W / ticks[-1]) for i, g in enumerate(groups))
    y_mid = TOP + plot_h / 2
    return (
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" role="img" '
        f'font-family="DejaVu Sans, Arial, sans-serif"><title>{_e(title)}</title>'
        f"{_svg_axis(ticks, plot_h, axis_label)}{bars}{_svg_legend(series)}"
        f'<text x="14" y="{y_mid:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {y_mid:.1f})">{_e(y_label)}</text></svg>'
    )


def _chart_series() -> list[Series]:
    return [(TARGET_LABELS[t], SERIES_COLOURS[t]) for t in TARGETS]


def _html_chart(attacks: Sequence[Mapping[str, Any]]) -> str:
    """Durations per attack; without any duration, how many attacks compromised each target."""
    series = _chart_series()
    if any(_duration(a, t) is not None for a in attacks for t in TARGETS):
        groups: list[Group] = [
            (str(a.get("name", "?")), [_duration(a, t) for t in TARGETS]) for a in attacks
        ]
        title = "Attack duration per target"
        svg = bar_chart_svg(groups, series, "Duration (s)", "Attack", title)
    else:
        states: tuple[State, ...] = ("compromised", "blocked", "error", "not run")
        groups = [
            (s, [float(sum(target_state(a, t) == s for a in attacks)) for t in TARGETS])
            for s in states
        ]
        title = "Attacks per outcome and target"
        svg = bar_chart_svg(groups, series, "Number of attacks", "Outcome", title)
    return f"<section><h2>{_e(title)}</h2>{svg}</section>"


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts, no fetches).

    Raises ValueError on an unknown X.805 cell.
    """
    attacks = _attacks(report)
    cov = coverage(attacks)
    body = (
        _html_header(report, cov)
        + _html_attack_matrix(attacks)
        + _html_attack_table(attacks)
        + _html_x805(cov)
        + _html_chart(attacks)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>trustmig attack lab report</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_reports(report: dict[str, Any], html_path: Path) -> tuple[Path, Path]:
    """Write ``html_path`` and a Markdown twin beside it (same stem, ``.md``); return both paths.

    Both are rendered before either is written, so a bad report leaves no half-written pair.
    """
    html_path = Path(html_path)
    md_path = html_path.with_suffix(".md")
    if md_path == html_path:
        raise ValueError(f"HTML report path {html_path} must not end in .md")
    page, markdown = render_html(report), render_markdown(report)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return html_path, md_path
