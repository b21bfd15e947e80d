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


def histogram_plot(raw: Mapping[str, Mapping[str, Sequence[float]]], threshold: float) -> str:
    """Overlaid toxicity histograms of reference and policy samples, one panel per evaluator."""
    names = [n for n, sides in raw.items() if sides.get("reference") or sides.get("policy")]
    if not names:
        return ""
    fig = Figure(figsize=(FIG_WIDTH, 3.0), layout="constrained")
    bins = np.linspace(0, 1, 26)
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        for side, color in (("reference", REFERENCE_COLOR), ("policy", POLICY_COLOR)):
            values = np.asarray(raw[name].get(side) or [], dtype=float)
            if values.size:
                ax.hist(values, bins=bins, color=color, alpha=0.45, label=side)
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


def _badge(role) -> str:
    """The evaluator's role; the reward's own scorer is marked: training optimised it, so it vouches for nothing."""
    if not role:
        return ""
    flag = f' <span class="flag">{TRAINED_ON}</span>' if role == "reward" else ""
    return f'<span class="badge {_e(role)}">{_e(role)}</span>{flag}'


def _count(m: Metric, side: Mapping) -> str:
    """"12/200 samples" next to a metric; empty when the counts are missing."""
    count = m.count(side)
    return "" if count is None else f' <span class="muted">({count[0]}/{count[1]} {m.level}s)</span>'


def _events(m: Metric, side: Mapping) -> tuple:
    """(toxic, all) events behind the metric, dashes when the counts are missing."""
    return m.count(side) or ("—", "—")


def _cards(evaluators: Mapping[str, Mapping]) -> str:
    cards, m = [], TOXICITY_PROBABILITY
    for name, ev in evaluators.items():
        d = ev.get("difference", {}).get(m.key, {})
        ref, pol = ev.get("reference", {}), ev.get("policy", {})
        (before, total), (after, _) = _events(m, ref), _events(m, pol)
        cards.append(
            f'<div class="card"><div class="name">{_e(name)}{_badge(ev.get("role"))}</div>'
            f'<div class="big">{m.format(m.value(ref))}<span class="arrow">→</span>{m.format(m.value(pol))}</div>'
            f'<div class="sub">{m.label} · toxic {m.level}s {before} → {after} of {total} · '
            f'<span class="{_verdict(m, d)}">'
            f'{m.format_change(d.get("estimate"))}</span> (p {_p(d)})</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _relative_cell(change: Mapping | None, extra: str = "") -> str:
    change = change or {}
    flag = "" if change.get("reliable") or not _ok(change.get("value")) else \
        ' <span class="flag" title="fewer than 10 toxic events for the reference">unreliable</span>'
    return f'<td class="num">{_fmt_num(change.get("value"), "+.1f", 100, "%")}{flag}{extra}</td>'


def _test_cell(diff: Mapping) -> str:
    discordant = diff.get("discordant")
    detail = (f'<br><span class="muted">discordant {discordant.get("reference_only")} / {discordant.get("policy_only")}'
              "</span>" if isinstance(discordant, Mapping) else "")
    return f'<td class="num">{_p(diff)} <span class="muted">{_e(diff.get("test", ""))}</span>{detail}</td>'


def _summary_table(evaluators: Mapping[str, Mapping]) -> str:
    rows = []
    for name, ev in evaluators.items():
        ref, pol = ev.get("reference", {}), ev.get("policy", {})
        diff, rel = ev.get("difference", {}), ev.get("relative_change", {})
        for i, m in enumerate(TOXICITY):
            spread = (lambda side: f' <span class="muted">± {_fmt_num(side.get("std"), m.spec)}</span>') \
                if m is MEAN_TOXICITY else (lambda side: "")
            std_change = rel.get("std_toxicity", {})
            extra = (f'<br><span class="muted">std {_fmt_num(std_change.get("value"), "+.1f", 100, "%")}</span>'
                     if m is MEAN_TOXICITY else "")
            head = (f'<td rowspan="{len(TOXICITY)}"><b>{_e(name)}</b>{_badge(ev.get("role"))}</td>'
                    if i == 0 else "")
            d = diff.get(m.key, {})
            rows.append(
                f'<tr{" class=group" if i == 0 else ""}>{head}<td class="nowrap">{_e(_title(m))}</td>'
                f'<td class="num">{m.format(m.value(ref))}{_count(m, ref)}{spread(ref)}</td>'
                f'<td class="num">{m.format(m.value(pol))}{_count(m, pol)}{spread(pol)}</td>'
                f'{_diff_cell(m, d)}{_test_cell(d)}{_relative_cell(rel.get(m.key), extra)}</tr>')
    head = ("<tr><th>Evaluator</th><th>Metric</th><th class='num'>Reference</th><th class='num'>Policy</th>"
            "<th class='num'>Difference [95% CI]</th><th class='num'>p-value · test</th>"
            "<th class='num'>Relative change</th></tr>")
    return f'<div class="panel"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _quality_rows(ref: Mapping, pol: Mapping, terms) -> str:
    """A row per quality metric either side has, the catalogue's first; a reward term's is marked."""
    keys = dict.fromkeys([*(m.key for m in QUALITY if m.key in ref or m.key in pol), *ref, *pol])
    rows = []
    for m in map(metric, keys):
        before, after = m.value(ref), m.value(pol)
        change = None if before is None or after is None else after - before
        rows.append(f'<tr><td>{_e(_title(m))}{_trained_on(m, terms)}</td><td class="num">{m.format(before)}</td>'
                    f'<td class="num">{m.format(after)}</td><td class="num">{m.format_change(change)}</td></tr>')
    return "".join(rows)


QUALITY_HEAD = ("<tr><th>Metric</th><th class='num'>Reference</th><th class='num'>Policy</th>"
                "<th class='num'>Difference</th></tr>")


def _quality_table(quality: Mapping[str, Mapping], terms) -> str:
    rows = _quality_rows(quality.get("reference", {}), quality.get("policy", {}), terms)
    if not rows:
        return ""
    return (f'<h2>Generation quality</h2><div class="panel"><table><thead>{QUALITY_HEAD}</thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _guards_and_calibration(evaluation: Mapping, terms) -> str:
    """The guards no reward term computes, with their paired CIs and the most common opening, then what
    texts of known quality score on every quality metric: which metrics carry information on this data."""
    guards, calibration = evaluation.get("guards") or {}, evaluation.get("calibration") or {}
    if not guards and not calibration:
        return ""
    parts = ["<h2>Guards the reward cannot buy</h2>"]
    differences = guards.get("differences") or {}
    if differences:
        rows = "".join(f'<tr><td>{_e(_title(metric(key)))}</td><td class="num">'
                       f'{_e(metric(key).format_interval(diff))}</td></tr>' for key, diff in differences.items())
        openings = "".join(f"<li>{_e(side)}: “{_e(guards[side].get('most_common_opening', ''))}” "
                           f"({guards[side].get('opening_responses', '—')} of {guards[side].get('responses', '—')})"
                           "</li>" for side in ("reference", "policy") if side in guards)
        parts.append(f'<div class="panel"><table><thead><tr><th>Guard</th><th class="num">Policy − reference '
                     f'[95% CI]</th></tr></thead><tbody>{rows}</tbody></table>'
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


def _group_tables(groups: Mapping[str, Mapping], column, terms) -> str:
    """Quality per group of prompts, so a loss on one kind of prompt is not averaged away."""
    if not groups:
        return ""
    parts = [f"<h2>Quality per group ({_e(column)})</h2>"]
    for value, block in groups.items():
        parts.append(f'<h3>{_e(column)} = {_e(value)} <span class="muted">· {block.get("num_prompts", "—")} prompts'
                     f'</span></h3><div class="panel"><table><thead>{QUALITY_HEAD}</thead><tbody>'
                     f'{_quality_rows(block.get("reference", {}), block.get("policy", {}), terms)}'
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


def render_report(metrics: Mapping, table: Sequence[Mapping], history: Sequence[Mapping], path: str | Path,
                  raw: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Path:
    """Write the evaluation report to ``path`` as one self-contained HTML file and return the path.

    ``metrics`` follows the layout of ``metrics.json`` (``run``, ``train``, ``evaluation``);
    ``table`` is a :func:`~detoxrl.evaluation.stats.qualitative_table`; ``history`` the
    per-step training logs; ``raw`` optional per-evaluator sample scores
    (``{name: {"reference": [...], "policy": [...]}}``) kept out of ``metrics`` so the
    JSON stays small.
    """
    evaluation = metrics.get("evaluation", {})
    evaluators = evaluation.get("evaluators", {})
    threshold = evaluation.get("threshold", 0.5)
    settings = {k: evaluation.get(k) for k in ("num_prompts", "toxicity_group", "toxicity_prompts", "control_prompts",
                                               "samples_per_prompt", "threshold", "reward",
                                               "fluency_model")}
    model = metrics.get("run", {}).get("model")
    parts = [
        f"<header><div class='inner'><h1>Detoxification report{' · ' + _e(model) if model else ''}</h1>"
        f"{_info(metrics.get('run', {}))}{_info(metrics.get('train', {}))}{_info(settings)}</div></header><main>",
    ]
    if evaluators:
        parts += ["<h2>Toxicity</h2>", _measured_on(evaluation), _cards(evaluators), _summary_table(evaluators),
                  f"<p class='note'>A sample is toxic when its toxicity probability is ≥ {threshold:g}. Toxicity "
                  "probability: share of prompts with at least one toxic sample among k; expected max. toxicity: "
                  "mean over prompts of the highest toxicity among k. Difference = policy − reference over the "
                  "same prompts (negative = less toxic); 95% CI from a paired bootstrap over prompts; p-value "
                  "from a paired permutation test, or the exact McNemar test (with its discordant prompts: toxic "
                  "only for the reference / only for the policy) for toxicity probability. Relative change = "
                  "(policy − reference) / |reference|, also for the std (the published recipe's \"improvement\" "
                  "is minus this); marked unreliable when the reference has fewer than 10 toxic prompts or "
                  "samples, the ratio's denominator.</p>",
                  "<h2>Improvement per evaluator</h2>", improvement_plot(evaluators)]
    if raw:
        parts += ["<h2>Toxicity distribution</h2>", histogram_plot(raw, threshold)]
    terms = trained_terms(evaluation)
    parts.append(_quality_table(evaluation.get("quality", {}), terms))
    parts.append(_guards_and_calibration(evaluation, terms))
    parts.append(_group_tables(evaluation.get("groups", {}), evaluation.get("group_column"), terms))
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
