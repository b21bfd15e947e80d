"""A single self-contained HTML report of an evaluation.

One file with inline CSS and plots embedded as base64 PNG, so it can be mailed,
archived next to the run or opened offline without losing anything.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..rundir import atomic_write_text
from .metrics import (
    EXPECTED_MAX_TOXICITY,
    LENGTH,
    MEAN_TOXICITY,
    QUALITY,
    TOXICITY,
    TOXICITY_PROBABILITY,
    TRAINED_ON,
    Metric,
    format_p,
    is_reward_term,
    metric,
    trained_terms,
    verdict,
)

REFERENCE_COLOR, POLICY_COLOR = "#e8590c", "#1c7ed6"
GOOD_COLOR, BAD_COLOR, NEUTRAL_COLOR = "#2b8a3e", "#c92a2a", "#868e96"
# {unit} is the training reward's unit, known only from the evaluation.
TRAINING_CURVES = (("env/reward_mean", "Reward (mean, {unit})"), ("objective/kl", "KL to reference (nats/response)"),
                   ("env/response_length_mean", "Response length (tokens)"), ("loss/policy", "Policy loss"))
QUALITATIVE_ROWS = 10
# (key in metrics.json, column heading) of each evaluated side. A model judged alone (detoxrl evaluate --model
# without --adapter) is a reference side only; it is the one model the report is about, so its column says so.
SIDES = (("reference", "Reference"), ("policy", "Policy"))
ALONE = (("reference", "Model"),)
ARROW = '<span class="arrow">→</span>'
FIG_WIDTH = 11.0  # inches; one width for all plots keeps their fonts the same size on the page

CSS = """
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #212529; line-height: 1.45;
       font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
header { background: #1b2838; color: #f1f3f5; padding: 26px 24px; }
header .inner { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header h1 { margin: 0 0 12px; font-size: 24px; font-weight: 600; }
dl.info { display: flex; flex-wrap: wrap; gap: 6px 28px; margin: 0; }
dl.info div { display: flex; gap: 6px; }
dl.info dt { color: #adb5bd; } dl.info dd { margin: 0; font-weight: 500; }
h2 { font-size: 18px; margin: 34px 0 12px; font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 14px;
         margin-bottom: 14px; }
.card, .panel { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.card { padding: 16px 18px; }
.card .name { font-weight: 600; font-size: 15px; }
.card .big { font-size: 26px; font-weight: 600; margin: 8px 0 2px; font-variant-numeric: tabular-nums; }
.card .big .arrow { color: #adb5bd; font-weight: 400; margin: 0 6px; }
.card .sub { color: #495057; font-size: 13px; }
.badge { display: inline-block; font-size: 11px; padding: 1px 7px; border-radius: 10px; margin-left: 6px;
         background: #e7f5ff; color: #1864ab; font-weight: 500; vertical-align: middle; }
.badge.held-out { background: #f3f0ff; color: #5f3dc4; }
.panel { padding: 4px 0; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 8px 12px; text-align: left; vertical-align: top; }
th { white-space: nowrap; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: #6c757d; font-weight: 600;
     border-bottom: 1px solid #dee2e6; }
tbody tr + tr td { border-top: 1px solid #f1f3f5; }
tbody tr.group td { border-top: 1px solid #dee2e6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.num { text-align: right; }
.good { color: #2b8a3e; font-weight: 600; } .bad { color: #c92a2a; font-weight: 600; }
.muted { color: #868e96; } .nowrap { white-space: nowrap; }
.flag { font-size: 11px; padding: 0 5px; border-radius: 8px; background: #fff3bf; color: #8f5b00; }
h3 { font-size: 15px; margin: 18px 0 8px; font-weight: 600; }
.note { color: #6c757d; font-size: 12.5px; margin: 8px 2px 0; }
figure { margin: 0 0 14px; background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
         padding: 12px; }
figure img { width: 100%; display: block; }
figcaption { color: #6c757d; font-size: 12.5px; margin-top: 6px; }
td.text { max-width: 340px; white-space: pre-wrap; word-wrap: break-word; font-size: 13px; }
"""


# --------------------------------------------------------------------------- formatting

def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt_value(key: str, value) -> str:
    """Human form of a run-info value: durations for ``*_s`` keys, 4 significant digits for floats."""
    if _ok(value) and (key.endswith("_s") or key.endswith("seconds")):
        m, s = divmod(int(round(value)), 60)
        h, m = divmod(m, 60)
        return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_num(x, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    return f"{x * scale:{spec}}{suffix}" if _ok(x) else "—"


def _p(diff: Mapping) -> str:
    return _e(format_p(diff) or "—")


def _verdict(m: Metric, diff: Mapping) -> str:
    """CSS class of a difference: good when its whole CI is on the metric's better side of zero."""
    return verdict(m, diff.get("ci_low"), diff.get("ci_high"))


def _diff_cell(m: Metric, diff: Mapping) -> str:
    ci = (f' <span class="muted">[{m.format_change(diff.get("ci_low"), unit=False)}, '
          f'{m.format_change(diff.get("ci_high"), unit=False)}]</span>' if _ok(diff.get("ci_low")) else "")
    return f'<td class="num"><span class="{_verdict(m, diff)}">{m.format_change(diff.get("estimate"))}</span>{ci}</td>'


def _e(x) -> str:
    return html.escape(str(x))


def _title(m: Metric) -> str:
    """The metric's name as a heading: capitalised."""
    return m.name[:1].upper() + m.name[1:]


def _sides(evaluation: Mapping) -> tuple[tuple[str, str], ...]:
    """:data:`ALONE` when the evaluation has a reference side and no policy side anywhere, else :data:`SIDES`."""
    blocks = [evaluation.get("quality") or {}, *(evaluation.get("evaluators") or {}).values()]
    alone = any("reference" in b for b in blocks) and not any("policy" in b for b in blocks)
    return ALONE if alone else SIDES


def _side_heads(sides) -> str:
    return "".join(f"<th class='num'>{heading}</th>" for _, heading in sides)


def _trained_on(m: Metric, terms) -> str:
    return f' <span class="flag">{TRAINED_ON}</span>' if is_reward_term(m, terms) else ""


LEARNING_CURVES = tuple((f"eval/{m.key}", _title(m)) for m in (TOXICITY_PROBABILITY, EXPECTED_MAX_TOXICITY,
                                                               MEAN_TOXICITY)) \
    + (("eval/response_length_words", _title(LENGTH)),)  # evaluate.judge_subset's name for length_mean


# --------------------------------------------------------------------------- plots

def _axes_style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=8.5)


def _png(fig: Figure, alt: str, caption: str) -> str:
    """A figure as an inline ``<img>``; the Agg canvas needs no display or GUI toolkit."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _smooth(y: np.ndarray) -> np.ndarray:
    """Trailing moving average (window = 5% of steps), so the trend shows through noisy batches.

    The window grows from one point at the start instead of padding, which would bend the ends.
    """
    w = max(1, len(y) // 20)
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(i - w, 0)]) / np.minimum(i, w)


def curves_plot(history: Sequence[Mapping], curves: Sequence[tuple[str, str]], caption: str) -> str:
    """One panel per logged quantity over steps; empty when none of ``curves`` was logged."""
    panels = []
    for key, label in curves:
        pts = [(h.get("step", i), h[key]) for i, h in enumerate(history) if _ok(h.get(key))]
        if pts:
            panels.append((label, np.array(pts, dtype=float)))
    if not panels:
        return ""
    fig = Figure(figsize=(FIG_WIDTH, 2.7), layout="constrained")
    for ax, (label, pts) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.plot(pts[:, 0], pts[:, 1], color=POLICY_COLOR, alpha=0.35 if len(pts) >= 40 else 1.0, linewidth=1,
                marker="o" if len(pts) < 40 else None, markersize=3)
        if len(pts) >= 40:
            ax.plot(pts[:, 0], _smooth(pts[:, 1]), color=POLICY_COLOR, linewidth=1.8)
        lo, hi = pts[:, 1].min(), pts[:, 1].max()
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # flat series: do not zoom into float rounding noise
            pad = 0.1 * max(abs(hi), 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        _axes_style(ax)
    return _png(fig, caption, caption)


def histogram_plot(raw: Mapping[str, Mapping[str, Sequence[float]]], threshold: float, sides=SIDES) -> str:
    """Overlaid toxicity histograms of each side's samples (reference and policy), one panel per evaluator."""
    names = [name for name, scores in raw.items() if any(scores.get(side) for side, _ in sides)]
    if not names:
        return ""
    fig = Figure(figsize=(FIG_WIDTH, 3.0), layout="constrained")
    bins = np.linspace(0, 1, 26)
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        for (side, heading), color in zip(sides, (REFERENCE_COLOR, POLICY_COLOR)):
            values = np.asarray(raw[name].get(side) or [], dtype=float)
            if values.size:
                ax.hist(values, bins=bins, color=color, alpha=0.45, label=heading.lower())
                ax.hist(values, bins=bins, color=color, histtype="step", linewidth=1.2)
        ax.axvline(threshold, color="#495057", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("toxicity probability", fontsize=9)
        ax.set_ylabel("samples (log)", fontsize=9)
        ax.legend(fontsize=8, frameon=False)
        _axes_style(ax)
    return _png(fig, "toxicity histograms",
                f"Distribution of toxicity scores; the dashed line is the toxicity threshold ({threshold:g}).")



def improvement_plot(evaluators: Mapping[str, Mapping]) -> str:
    """Policy − reference differences with 95% CIs, so significance is visible at a glance."""
    names = list(evaluators)
    if not names:
        return ""
    fig = Figure(figsize=(FIG_WIDTH, 0.55 * len(names) + 1.3), layout="constrained")
    for ax, m in zip(fig.subplots(1, 2, sharey=True), (TOXICITY_PROBABILITY, EXPECTED_MAX_TOXICITY)):
        scale = 100.0 if m.unit == "%" else 1.0
        for y, name in enumerate(names):
            d = evaluators[name].get("difference", {}).get(m.key, {})
            if not _ok(d.get("estimate")):
                continue
            color = {"good": GOOD_COLOR, "bad": BAD_COLOR}.get(_verdict(m, d), NEUTRAL_COLOR)
            est = d["estimate"] * scale
            if _ok(d.get("ci_low")) and _ok(d.get("ci_high")):
                err = [[est - d["ci_low"] * scale], [d["ci_high"] * scale - est]]
                ax.errorbar(est, y, xerr=err, fmt="o", color=color, capsize=4, markersize=6, linewidth=1.6)
            else:
                ax.plot(est, y, "o", color=color)
        ax.axvline(0, color="#495057", linewidth=1)
        ax.set_yticks(range(len(names)), names, fontsize=9)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"Δ {m.label}{' (pp)' if m.unit == '%' else ''}", fontsize=10)
        _axes_style(ax)
    return _png(fig, "improvement per evaluator",
                "Policy − reference with 95% paired bootstrap CI over prompts; left of zero is less toxic "
                "(green: CI below zero, red: above, grey: includes zero).")


# --------------------------------------------------------------------------- sections

def _info(items: Mapping) -> str:
    cells = "".join(f"<div><dt>{_e(k.removesuffix('_s').replace('_', ' '))}</dt><dd>{_e(_fmt_value(k, v))}</dd></div>"
                    for k, v in items.items() if v is not None and not isinstance(v, (dict, list)))
    return f'<dl class="info">{cells}</dl>' if cells else ""


def _badge(role, trained: bool) -> str:
    """The evaluator's role; the reward's own scorer is marked when a policy was ``trained`` on it: training
    optimised it, so it vouches for nothing. A model judged alone was trained on nothing."""
    if not role:
        return ""
    flag = f' <span class="flag">{TRAINED_ON}</span>' if trained and role == "reward" else ""
    return f'<span class="badge {_e(role)}">{_e(role)}</span>{flag}'


def _count(m: Metric, side: Mapping) -> str:
    """"12/200 samples" next to a metric; empty when the counts are missing."""
    count = m.count(side)
    return "" if count is None else f' <span class="muted">({count[0]}/{count[1]} {m.level}s)</span>'


def _events(m: Metric, side: Mapping) -> tuple:
    """(toxic, all) events behind the metric, dashes when the counts are missing."""
    return m.count(side) or ("—", "—")


def _cards(evaluators: Mapping[str, Mapping], sides) -> str:
    """Each judge's toxicity probability and toxic prompts, side after side, and with two sides their difference."""
    cards, m, paired = [], TOXICITY_PROBABILITY, len(sides) > 1
    for name, ev in evaluators.items():
        blocks = [ev.get(side, {}) for side, _ in sides]
        events = [_events(m, block) for block in blocks]
        change = ""
        if paired:
            d = ev.get("difference", {}).get(m.key, {})
            change = f' · <span class="{_verdict(m, d)}">{m.format_change(d.get("estimate"))}</span> (p {_p(d)})'
        cards.append(
            f'<div class="card"><div class="name">{_e(name)}{_badge(ev.get("role"), paired)}</div>'
            f'<div class="big">{ARROW.join(m.format(m.value(block)) for block in blocks)}</div>'
            f'<div class="sub">{m.label} · toxic {m.level}s {" → ".join(str(toxic) for toxic, _ in events)} '
            f'of {events[0][1]}{change}</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _relative_cell(change: Mapping | None, extra: str = "") -> str:
    change = change or {}
    flag = "" if change.get("reliable") or not _ok(change.get("value")) else \
        ' <span class="flag" title="fewer than 10 toxic events for the reference">unreliable</span>'
    interval = (f'<br><span class="muted">[{_fmt_num(change["ci_low"], "+.1f", 100, "%")}, '
                f'{_fmt_num(change["ci_high"], "+.1f", 100, "%")}]</span>' if _ok(change.get("ci_low")) else "")
    return f'<td class="num">{_fmt_num(change.get("value"), "+.1f", 100, "%")}{interval}{flag}{extra}</td>'


def _test_cell(diff: Mapping) -> str:
    discordant = diff.get("discordant")
    detail = (f'<br><span class="muted">discordant {discordant.get("reference_only")} / {discordant.get("policy_only")}'
              "</span>" if isinstance(discordant, Mapping) else "")
    return f'<td class="num">{_p(diff)} <span class="muted">{_e(diff.get("test", ""))}</span>{detail}</td>'


def _summary_table(evaluators: Mapping[str, Mapping], sides) -> str:
    """Every toxicity metric of each judge with its counts, side by side; with two sides the paired statistics."""
    rows, paired = [], len(sides) > 1
    for name, ev in evaluators.items():
        blocks = [ev.get(side, {}) for side, _ in sides]
        diff, rel = ev.get("difference", {}), ev.get("relative_change", {})
        for i, m in enumerate(TOXICITY):
            spread = (lambda side: f' <span class="muted">± {_fmt_num(side.get("std"), m.spec)}</span>') \
                if m is MEAN_TOXICITY else (lambda side: "")
            std_change = rel.get("std_toxicity", {})
            extra = (f'<br><span class="muted">std {_fmt_num(std_change.get("value"), "+.1f", 100, "%")}</span>'
                     if m is MEAN_TOXICITY else "")
            head = (f'<td rowspan="{len(TOXICITY)}"><b>{_e(name)}</b>{_badge(ev.get("role"), paired)}</td>'
                    if i == 0 else "")
            d = diff.get(m.key, {})
            values = "".join(f'<td class="num">{m.format(m.value(block))}{_count(m, block)}{spread(block)}</td>'
                             for block in blocks)
            statistics = f'{_diff_cell(m, d)}{_test_cell(d)}{_relative_cell(rel.get(m.key), extra)}' if paired else ""
            rows.append(f'<tr{" class=group" if i == 0 else ""}>{head}<td class="nowrap">{_e(_title(m))}</td>'
                        f'{values}{statistics}</tr>')
    head = ("<tr><th>Evaluator</th><th>Metric</th>" + _side_heads(sides)
            + ("<th class='num'>Difference [95% CI]</th><th class='num'>p-value · test</th>"
               "<th class='num'>Relative change</th>" if paired else "") + "</tr>")
    return f'<div class="panel"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _quality_rows(quality: Mapping[str, Mapping], sides, terms) -> str:
    """A row per quality metric any side has, the catalogue's first, with two sides' difference; a reward term's
    is marked."""
    blocks = [quality.get(side) or {} for side, _ in sides]
    keys = dict.fromkeys([*(m.key for m in QUALITY if any(m.key in block for block in blocks)),
                          *(key for block in blocks for key in block)])
    rows = []
    for m in map(metric, keys):
        values = [m.value(block) for block in blocks]
        cells = "".join(f'<td class="num">{m.format(x)}</td>' for x in values)
        if len(values) > 1:
            before, after = values
            change = None if before is None or after is None else after - before
            cells += f'<td class="num">{m.format_change(change)}</td>'
        rows.append(f'<tr><td>{_e(_title(m))}{_trained_on(m, terms)}</td>{cells}</tr>')
    return "".join(rows)


def _quality_head(sides) -> str:
    return (f"<tr><th>Metric</th>{_side_heads(sides)}"
            + ("<th class='num'>Difference</th>" if len(sides) > 1 else "") + "</tr>")


def _quality_table(quality: Mapping[str, Mapping], sides, terms) -> str:
    rows = _quality_rows(quality, sides, terms)
    if not rows:
        return ""
    return (f'<h2>Generation quality</h2><div class="panel"><table><thead>{_quality_head(sides)}</thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _guards_and_calibration(evaluation: Mapping, sides, terms) -> str:
    """The guards no reward term computes, with their paired CIs (a model judged alone: its own values) and the
    most common opening, then what texts of known quality score on every quality metric: which metrics carry
    information on this data."""
    guards, calibration = evaluation.get("guards") or {}, evaluation.get("calibration") or {}
    if not guards and not calibration:
        return ""
    parts = ["<h2>Guards the reward cannot buy</h2>"]
    if len(sides) == 1:
        own = guards.get(sides[0][0]) or {}
        column, cells = sides[0][1], {m.key: m.format(m.value(own)) for m in QUALITY if m.key in own}
    else:
        column = "Policy − reference [95% CI]"
        cells = {key: metric(key).format_interval(diff) for key, diff in (guards.get("differences") or {}).items()}
    if cells:
        rows = "".join(f'<tr><td>{_e(_title(metric(key)))}</td><td class="num">{_e(cell)}</td></tr>'
                       for key, cell in cells.items())
        openings = "".join(f"<li>{_e(heading.lower())}: “{_e(guards[side].get('most_common_opening', ''))}” "
                           f"({guards[side].get('opening_responses', '—')} of {guards[side].get('responses', '—')})"
                           "</li>" for side, heading in sides if side in guards)
        parts.append(f'<div class="panel"><table><thead><tr><th>Guard</th><th class="num">{column}'
                     f'</th></tr></thead><tbody>{rows}</tbody></table>'
                     f'<p class="note">Most common opening (first four words):</p><ul>{openings}</ul></div>')
    if calibration:
        names = list(calibration)
        keys = [m.key for m in QUALITY if any(m.key in row for row in calibration.values())]
        head = "".join(f"<th class='num'>{_e(name)}</th>" for name in names)
        rows = "".join(f"<tr><td>{_e(_title(metric(key)))}{_trained_on(metric(key), terms)}</td>"
                       + "".join(f'<td class="num">{metric(key).format(metric(key).value(calibration[name]))}</td>'
                                 for name in names) + "</tr>" for key in keys)
        parts.append(f'<h3>Calibration: texts of known quality, scored the same way</h3><div class="panel"><table>'
                     f"<thead><tr><th>Metric</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
                     "<p class='note'>A metric on which the content-free sentence matches or beats the models "
                     "says little about whether the responses still summarise their dialogue.</p></div>")
    return "".join(parts)


def _group_tables(groups: Mapping[str, Mapping], column, sides, terms) -> str:
    """Quality per group of prompts, so a loss on one kind of prompt is not averaged away."""
    if not groups:
        return ""
    parts = [f"<h2>Quality per group ({_e(column)})</h2>"]
    for value, block in groups.items():
        parts.append(f'<h3>{_e(column)} = {_e(value)} <span class="muted">· {block.get("num_prompts", "—")} prompts'
                     f'</span></h3><div class="panel"><table><thead>{_quality_head(sides)}</thead><tbody>'
                     f'{_quality_rows(block, sides, terms)}'
                     "</tbody></table></div>")
    return "".join(parts)


def _measured_on(evaluation: Mapping) -> str:
    """Which prompts toxicity was measured on, when eval.toxicity_group set some apart for quality only."""
    group = evaluation.get("toxicity_group")
    if group is None:
        return ""
    return (f"<p class='note'>Toxicity: {_e(evaluation.get('toxicity_prompts'))} prompts with "
            f"{_e(evaluation.get('group_column'))} = {_e(group)}; quality: all {_e(evaluation.get('num_prompts'))} "
            f"prompts, {_e(evaluation.get('control_prompts'))} of them from the other groups as controls.</p>")


def _bars(evaluation: Mapping) -> str:
    """The frozen protocol and whether each of its bars holds (eval.protocol)."""
    protocol, bars = evaluation.get("protocol", {}), evaluation.get("bars")
    if not bars:
        return ""
    rows = "".join(
        f'<tr><td>{_e(b["metric"])}</td><td>{_e(BAR_WORDS.get(b["kind"], b["kind"]))} {b["bar"]:g}</td>'
        f'<td class="num">{_fmt_num(b.get("value"), ".3f")}</td>'
        f'<td class="{"good" if b["holds"] else "bad"}">{"holds" if b["holds"] else "fails"}</td></tr>' for b in bars)
    held = sum(b["holds"] for b in bars)
    return (f"<h2>Protocol bars: {held} of {len(bars)} hold</h2><div class='panel'><table><thead><tr><th>Metric</th>"
            f"<th>Bar</th><th class='num'>Measured</th><th>Verdict</th></tr></thead><tbody>{rows}</tbody></table></div>"
            f"<p class='note'>Protocol {_e(protocol.get('name'))} v{_e(protocol.get('version'))} (sha256 "
            f"{_e(str(protocol.get('sha256', ''))[:12])}…), fixed before its prompts were first evaluated. Ratios and "
            "relative changes are policy against reference; a toxicity bar also needs its difference's 95% CI below "
            "zero. Toxicity bars read the first held-out judge.</p>")


BAR_WORDS = {"max_relative_change": "relative change ≤", "min_ratio": "policy / reference ≥",
             "max_ratio": "policy / reference ≤", "max": "policy ≤"}


def _toxicity_class(diff) -> str:
    """Less toxic is good."""
    return "" if not _ok(diff) or diff == 0 else "good" if diff < 0 else "bad"


def _qualitative(table: Sequence[Mapping], judge, k) -> str:
    """Most and least improved prompts by the judge's mean over k samples; with few rows each is shown once."""
    if not table:
        return ""
    top = list(table[:QUALITATIVE_ROWS])
    bottom = list(table[max(QUALITATIVE_ROWS, len(table) - QUALITATIVE_ROWS):])[::-1]
    rewards = any("reward_before" in r for r in table)
    head = ("<tr><th>Query</th><th>Reference response</th><th>Policy response</th>"
            "<th class='num'>Toxicity before</th><th class='num'>Toxicity after</th><th class='num'>Difference</th>"
            + ("<th class='num'>Reward before / after</th>" if rewards else "") + "</tr>")

    def block(title: str, rows: list) -> str:
        body = "".join(
            f'<tr><td class="text">{_e(r.get("query", ""))}</td><td class="text">{_e(r.get("response_before", ""))}</td>'
            f'<td class="text">{_e(r.get("response_after", ""))}</td>'
            f'<td class="num">{_fmt_num(r.get("toxicity_before"), ".3f")}</td>'
            f'<td class="num">{_fmt_num(r.get("toxicity_after"), ".3f")}</td>'
            f'<td class="num"><span class="{_toxicity_class(r.get("difference"))}">'
            f'{_fmt_num(r.get("difference"), "+.3f")}</span></td>'
            + (f'<td class="num">{_fmt_num(r.get("reward_before"), ".2f")} / {_fmt_num(r.get("reward_after"), ".2f")}</td>'
               if rewards else "") + "</tr>" for r in rows)
        return f'<h2>{title}</h2><div class="panel"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>'

    note = (f"<p class='note'>Ranked by {_e(judge or 'the judge')}'s mean toxicity over the {_e(k or 'k')} samples "
            "of each prompt (difference = policy − reference; negative is less toxic). Each side shows its most "
            "toxic sample; rewards are the training reward's mean over the same samples.</p>")
    return (block("Most improved prompts", top) + (block("Least improved prompts", bottom) if bottom else "")
            + note)


PAIRED_NOTE = (" Difference = policy − reference over the same prompts (negative = less toxic); 95% CI from a paired "
               "bootstrap over prompts; p-value from a paired permutation test, or the exact McNemar test (with its "
               "discordant prompts: toxic only for the reference / only for the policy) for toxicity probability. "
               "Relative change = (policy − reference) / |reference|, with its 95% CI from the same paired bootstrap "
               "over prompts, also for the std (the published recipe's \"improvement\" is minus this); marked "
               "unreliable when the reference has fewer than 10 toxic prompts or samples, the ratio's denominator.")


def _judged_alone(output_dir) -> str:
    """What a one-model report lacks, and the command that supplies it."""
    return ("<p>This model was judged alone (<code>detoxrl evaluate --model</code> without <code>--adapter</code>): "
            "the figures are its own, with no policy to set against them, so there are no differences, no bars and "
            "no ranked examples. To see a change, compare it with another evaluation (a run, or another model "
            f"judged alone): <code>detoxrl compare {_e(output_dir or 'THIS_DIR')} OTHER_DIR</code>.</p>")


def render_report(metrics: Mapping, table: Sequence[Mapping], history: Sequence[Mapping], path: str | Path,
                  raw: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Path:
    """Write the evaluation report to ``path`` as one self-contained HTML file and return the path.

    ``metrics`` follows the layout of ``metrics.json`` (``run``, ``train``, ``evaluation``);
    ``table`` is a :func:`~detoxrl.evaluation.stats.qualitative_table`; ``history`` the
    per-step training logs; ``raw`` optional per-evaluator sample scores
    (``{name: {"reference": [...], "policy": [...]}}``) kept out of ``metrics`` so the
    JSON stays small. An evaluation without a policy side (a model judged alone) gives a
    one-model report: one column of figures, no differences.
    """
    evaluation = metrics.get("evaluation", {})
    evaluators = evaluation.get("evaluators", {})
    threshold = evaluation.get("threshold", 0.5)
    settings = {k: evaluation.get(k) for k in ("num_prompts", "toxicity_group", "toxicity_prompts", "control_prompts",
                                               "samples_per_prompt", "threshold", "reward",
                                               "fluency_model")}
    model = metrics.get("run", {}).get("model")
    sides = _sides(evaluation)
    paired = len(sides) > 1
    parts = [
        f"<header><div class='inner'><h1>Detoxification report{' · ' + _e(model) if model else ''}</h1>"
        f"{_info(metrics.get('run', {}))}{_info(metrics.get('train', {}))}{_info(settings)}</div></header><main>",
    ]
    if not paired:
        parts.append(_judged_alone(metrics.get("run", {}).get("output_dir")))
    if evaluators:
        parts += ["<h2>Toxicity</h2>", _measured_on(evaluation), _cards(evaluators, sides),
                  _summary_table(evaluators, sides),
                  f"<p class='note'>A sample is toxic when its toxicity probability is ≥ {threshold:g}. Toxicity "
                  "probability: share of prompts with at least one toxic sample among k; expected max. toxicity: "
                  "mean over prompts of the highest toxicity among k." + (PAIRED_NOTE if paired else "") + "</p>"]
    if evaluators and paired:
        parts += ["<h2>Improvement per evaluator</h2>", improvement_plot(evaluators)]
    if raw:
        parts += ["<h2>Toxicity distribution</h2>", histogram_plot(raw, threshold, sides)]
    parts.append(_bars(evaluation))
    terms = trained_terms(evaluation)
    parts.append(_quality_table(evaluation.get("quality", {}), sides, terms))
    parts.append(_guards_and_calibration(evaluation, sides, terms))
    parts.append(_group_tables(evaluation.get("groups", {}), evaluation.get("group_column"), sides, terms))
    # a composite reward has no one unit; its terms are named in the header's "reward"
    unit = evaluation.get("reward_unit") if " + " not in (evaluation.get("reward") or "") else "composite"
    unit = unit or "reward units"
    training = curves_plot(history, [(key, label.format(unit=unit)) for key, label in TRAINING_CURVES],
                           "Training curves per step (thin: raw; thick: moving average).")
    if training:
        parts += ["<h2>Training</h2>", training]
    learning = curves_plot(history, LEARNING_CURVES, "Held-out toxicity of the policy on a fixed prompt subset "
                                                     "during training.")
    if learning:
        parts += ["<h2>Learning curves</h2>", learning]
    parts += [_qualitative(table, evaluation.get("examples_judge"), evaluation.get("samples_per_prompt")), "</main>"]
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>Detoxification report</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, doc)
