"""The static HTML report of the statistics: one self-contained file, charts as inline SVG, no
scripts and nothing fetched from the internet."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from engine.simulator import DemoConfig, SimulationSummary
from engine.stats import BREAKDOWNS, StatRow, Stats, points

__all__ = ["render_report", "write_report"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2330}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem}td,th{padding:.25rem .6rem;text-align:right}
th{background:#eef1f6}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#f8f9fb}.muted{color:#6b7385}.sig{font-weight:600}
.kpi{display:inline-block;margin-right:2rem}.kpi b{font-size:1.3rem;display:block}
"""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ci(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "-"
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]"


def forest_svg(rows: list[StatRow], planted: Mapping[tuple[str, str | None], float] | None,
               ) -> str:
    """Lift per sent message with its 95% interval per trigger; planted effects as diamonds."""
    scored = [r for r in rows if r.lift_per_sent is not None]
    if not scored:
        return "<p class='muted'>No trigger has a scored holdout comparison yet.</p>"
    lows = [r.ci_low_per_sent or 0.0 for r in scored] + [0.0]
    highs = [r.ci_high_per_sent or 0.0 for r in scored] + [0.0]
    if planted:
        lows += [v / 100 for v in planted.values()]
        highs += [v / 100 for v in planted.values()]
    lo, hi = max(min(lows), -0.5), min(max(highs), 0.5)
    span = (hi - lo) or 0.1
    left, width, row_h = 200, 520, 24
    height = row_h * len(scored) + 40

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / span * width

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + width + 40}' "
             f"height='{height}' role='img' aria-label='lift per trigger'>",
             f"<line x1='{x(0):.1f}' y1='10' x2='{x(0):.1f}' y2='{height - 25}' "
             "stroke='#999' stroke-dasharray='4 3'/>"]
    step = 0.05 if span <= 0.4 else 0.1
    index = math.ceil(lo / step - 1e-9)
    while index * step <= hi + 1e-9:
        tick = index * step
        label = "0" if index == 0 else f"{tick * 100:+.0f}"
        parts.append(f"<text x='{x(tick):.1f}' y='{height - 8}' font-size='10' "
                     f"text-anchor='middle' fill='#555'>{label}</text>")
        index += 1
    for i, r in enumerate(scored):
        y = 20 + i * row_h
        label = escape(r.trigger_id + (f" / {r.variant}" if r.variant else ""))
        sig = r.p_value is not None and r.p_value < 0.05
        color = "#1f6feb" if sig else "#8b95a7"
        parts.append(f"<text x='{left - 8}' y='{y + 4}' font-size='12' "
                     f"text-anchor='end'>{label}</text>")
        parts.append(f"<line x1='{x(r.ci_low_per_sent or 0):.1f}' y1='{y}' "
                     f"x2='{x(r.ci_high_per_sent or 0):.1f}' y2='{y}' stroke='{color}' "
                     "stroke-width='2'/>")
        parts.append(f"<circle cx='{x(r.lift_per_sent or 0):.1f}' cy='{y}' r='4' "
                     f"fill='{color}'><title>{label}: {points(r.lift_per_sent)} pp "
                     f"{_ci(r.ci_low_per_sent, r.ci_high_per_sent)}</title></circle>")
        if planted and (r.trigger_id, r.variant) in planted:
            px = x(planted[(r.trigger_id, r.variant)] / 100)
            parts.append(f"<path d='M{px:.1f} {y - 6} l5 6 l-5 6 l-5 -6 z' fill='none' "
                         "stroke='#d1242f' stroke-width='1.5'><title>planted</title></path>")
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(values: Mapping[str, int], *, color: str = "#2da44e") -> str:
    """Horizontal bars, one per key."""
    if not values:
        return "<p class='muted'>Nothing yet.</p>"
    top = max(values.values()) or 1
    left, width, row_h = 200, 420, 20
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + width + 80}' "
             f"height='{row_h * len(values) + 10}'>"]
    for i, (key, value) in enumerate(sorted(values.items(), key=lambda kv: -kv[1])):
        y = 5 + i * row_h
        w = value / top * width
        parts.append(f"<text x='{left - 8}' y='{y + 13}' font-size='12' "
                     f"text-anchor='end'>{escape(key)}</text>"
                     f"<rect x='{left}' y='{y + 2}' width='{w:.1f}' height='{row_h - 6}' "
                     f"fill='{color}'/><text x='{left + w + 6:.1f}' y='{y + 13}' "
                     f"font-size='11'>{value}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _rows_table(rows: list[StatRow], planted: Mapping[tuple[str, str | None], float] | None,
                first: str = "trigger") -> str:
    head = [first, "n treated", "n holdout", "sent", "delivered", "opened", "clicked",
            "conv. treated", "conv. holdout", "lift pp", "95% CI", "relative", "p",
            "per sent pp", "95% CI", "any-touch", "last-touch"]
    if planted is not None:
        head.append("planted pp")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        name = r.group if r.breakdown else (r.variant and f"&nbsp;&nbsp;{escape(r.variant)}"
                                            or escape(r.trigger_id))
        if r.breakdown:
            name = f"{escape(r.trigger_id)} · {escape(str(r.group))}"
        sig = " class='sig'" if r.p_value is not None and r.p_value < 0.05 else ""
        cells = [str(name), str(r.n_treatment), str(r.n_holdout), str(r.sent), str(r.delivered),
                 str(r.opened), str(r.clicked), _pct(r.rate_treatment), _pct(r.rate_holdout),
                 points(r.lift), _ci(r.ci_low, r.ci_high),
                 "-" if r.relative_lift is None else f"{r.relative_lift * 100:+.0f}%",
                 "-" if r.p_value is None else f"{r.p_value:.3f}", points(r.lift_per_sent),
                 _ci(r.ci_low_per_sent, r.ci_high_per_sent),
                 "-" if r.any_touch is None else str(r.any_touch),
                 "-" if r.last_touch is None else str(r.last_touch)]
        if planted is not None:
            value = planted.get((r.trigger_id, r.variant))
            cells.append("-" if value is None else f"{value:+.1f}")
        out.append(f"<tr{sig}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render_report(stats: Stats, *, title: str = "Touchpoints: trigger statistics",
                  planted: Mapping[tuple[str, str | None], float] | None = None,
                  facts: Mapping[str, Any] | None = None,
                  messages_by_channel: Mapping[str, int] | None = None) -> str:
    """The whole report as one HTML string."""
    main = [r for r in stats.rows if r.breakdown is None]
    per_trigger = {r.trigger_id: r.sent for r in stats.triggers()}
    body = [f"<h1>{escape(title)}</h1>",
            f"<p class='muted'>Scored as of {stats.as_of:%Y-%m-%d %H:%M} UTC"
            + (f", every goal re-scored with a {stats.window_days}-day window"
               if stats.window_days else "")
            + f"; generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>"]
    if facts:
        body.append("<div>" + "".join(f"<span class='kpi'><b>{escape(str(v))}</b>"
                                      f"{escape(k)}</span>" for k, v in facts.items()) + "</div>")
    body += ["<h2>Effect of each trigger on its goal (per message sent, 95% interval)</h2>",
             "<p class='muted'>Treatment arm minus holdout arm (intention to treat), divided by "
             "the share of the treatment arm actually sent. Blue: p &lt; 0.05"
             + ("; red diamonds: the planted true effect" if planted else "") + ".</p>",
             forest_svg(main, planted),
             "<h2>Per trigger and variant</h2>", _rows_table(main, planted),
             "<h2>Messages sent per trigger</h2>", bars_svg(per_trigger)]
    if messages_by_channel:
        body += ["<h2>Messages per channel</h2>", bars_svg(messages_by_channel, color="#8250df")]
    for dim in BREAKDOWNS:
        rows = [r for r in stats.rows if r.breakdown == dim]
        if rows:
            body += [f"<h2>By {escape(dim)}</h2>", _rows_table(rows, None, first=dim)]
    body.append("<p class='muted'>Units: one trigger, customer and membership cycle. Intervals: "
                "Newcomb; p-values: score test (statsmodels).</p>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_report(path: Path, stats: Stats, config: DemoConfig | None = None,
                 summary: SimulationSummary | None = None, *,
                 messages_by_channel: Mapping[str, int] | None = None,
                 seconds: float | None = None) -> Path:
    """Write the report of a demo run (or of any stats) to `path`; returns the path."""
    facts: dict[str, Any] = {}
    if summary is not None:
        facts = {"members": summary.members, "days replayed": summary.days,
                 "messages sent": summary.sent, "renewals": summary.renewals,
                 "lapses": summary.lapses, "come-backs": summary.comebacks}
    if seconds is not None:
        facts["seconds to simulate"] = f"{seconds:.0f}"
    html = render_report(stats, title="Riverside Fitness demo: what each trigger did"
                         if config else "Touchpoints: trigger statistics",
                         planted=config.planted() if config else None, facts=facts,
                         messages_by_channel=messages_by_channel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path.resolve()
