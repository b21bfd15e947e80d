"""Evaluated runs as rich tables: two side by side (``detoxrl compare``), and one run's headline.

A run's training numbers are in ``RUN/metrics.json``; its evaluation is there too (the end-of-training
evaluation) and in ``RUN/eval/metrics.json`` once ``detoxrl evaluate RUN`` ran. The newer of the two is shown.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from detoxrl.errors import DetoxError
from detoxrl.rundir import RunDir

from .metrics import (
    EXPECTED_MAX_TOXICITY,
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


class Row(NamedTuple):
    """One metric of runs A and B; ``counts_*`` are the toxic events behind it, e.g. "3/10 prompts"."""

    label: str
    a: float | None
    b: float | None
    counts_a: str | None = None
    counts_b: str | None = None
    metric: Metric | None = None  # None for a training statistic, which the catalogue does not describe


Value = tuple[Metric | None, float | None, str | None]  # a metric, its value and its counts
SIDES = ("reference", "policy")


def read_metrics(path: Path) -> dict:
    """One ``metrics.json``; a broken file is a user error."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetoxError(f"cannot read {path}: {exc}") from None
    if not isinstance(metrics, dict):
        raise DetoxError(f"cannot read {path}: expected a JSON object")
    return metrics


def load_metrics(run_dir: str | Path) -> tuple[dict, Path | None]:
    """A run's metrics, and the file its evaluation came from (None when it has none).

    The training numbers come from ``RUN/metrics.json``; the evaluation from whichever of
    ``RUN/metrics.json`` and ``RUN/eval/metrics.json`` was written last and holds one.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DetoxError(f"{run_dir} is not a directory")
    found = {path: read_metrics(path) for path in (run.metrics, RunDir(run.eval).metrics) if path.is_file()}
    if not found and not run.config.is_file():
        raise DetoxError(f"{run_dir} is not a detoxrl run directory (neither config.yaml nor metrics.json is there)")
    if not found:
        raise DetoxError(f"no metrics.json in {run_dir}: the run did not finish; finish it with detoxrl train "
                         "--output_dir RUN --resume, or evaluate it with detoxrl evaluate")
    evaluated = [path for path, metrics in found.items() if "evaluation" in metrics]
    # the later file wins; on equal times, evaluate's (it can only run after training)
    source = max(evaluated, key=lambda p: (p.stat().st_mtime_ns, p != run.metrics), default=None)
    metrics = dict(found.get(run.metrics, {}))
    if source is not None:
        metrics["evaluation"] = found[source]["evaluation"]
    return metrics, source


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _counts(m: Metric, side: dict) -> str | None:
    """"3/10 prompts": the toxic events behind the metric; None when the metrics lack them."""
    count = m.count(side)
    return None if count is None else f"{count[0]}/{count[1]} {m.level}s"


def _rows(metrics: tuple[Metric, ...], sides: dict) -> dict[str, Value]:
    """A row per metric and side, for the metrics either side has."""
    rows = {f"{m.name} ({side})": (m, m.value(sides.get(side, {})), _counts(m, sides.get(side, {})))
            for m in metrics for side in SIDES}
    return {label: value for label, value in rows.items() if value[1:] != (None, None)}


def _sections(metrics: dict) -> dict[str, dict[str, Value]]:
    """The comparable numbers of one run, grouped into titled sections of label -> (metric, value, counts)."""
    evaluation = metrics.get("evaluation", {})
    sections = {f"toxicity · {name}": _rows(TOXICITY, ev) for name, ev in evaluation.get("evaluators", {}).items()}
    quality = evaluation.get("quality", {})
    keys = dict.fromkeys([*(m.key for m in QUALITY), *quality.get("reference", {}), *quality.get("policy", {})])
    sections["quality"] = _rows(tuple(metric(key) for key in keys), quality)
    sections["training"] = {key: (None, _number(value), None) for key, value in metrics.get("train", {}).items()
                            if _number(value) is not None}
    return {title: rows for title, rows in sections.items() if rows}


def _trained_on(m: Metric | None, terms_a: frozenset[str], terms_b: frozenset[str]) -> str:
    """The mark of a metric that run A's or B's reward computes: the run optimised it, so it guards nothing."""
    runs = [run for run, terms in (("A", terms_a), ("B", terms_b)) if m is not None and is_reward_term(m, terms)]
    if not runs:
        return ""
    return f" · {TRAINED_ON}" if len(runs) == 2 else f" · {TRAINED_ON} (run {runs[0]})"


def compare_rows(metrics_a: dict, metrics_b: dict) -> list[tuple[str, list[Row]]]:
    """Per section, a :class:`Row` per metric over the union of both runs' metrics.

    A metric only one run has still appears, with ``None`` for the other, so a
    missing evaluator is visible rather than silently dropped.
    """
    a, b = _sections(metrics_a), _sections(metrics_b)
    terms_a, terms_b = (trained_terms(m.get("evaluation", {})) for m in (metrics_a, metrics_b))
    out = []
    for title in dict.fromkeys([*a, *b]):
        rows_a, rows_b = a.get(title, {}), b.get(title, {})
        rows = []
        for label in dict.fromkeys([*rows_a, *rows_b]):
            (m_x, x, counts_x), (m_y, y, counts_y) = (side.get(label, (None, None, None)) for side in (rows_a, rows_b))
            m = m_x or m_y
            rows.append(Row(label + _trained_on(m, terms_a, terms_b), x, y, counts_x, counts_y, m))
        out.append((title, rows))
    return out


def _cell(x: float | None, m: Metric | None, signed: bool = False, counts: str | None = None) -> str:
    if m is None:
        text = "—" if x is None else f"{x:+.4g}" if signed else f"{x:.4g}"
    else:
        text = m.format_change(x) if signed else m.format(x)
    return f"{text} ({counts})" if counts else text


def check_same_protocol(metrics_a: dict, metrics_b: dict) -> None:
    """Refuse two evaluations whose data or protocol differ: their figures are not comparable.

    An evaluation written before protocols were recorded has none, and is compared as it is.
    """
    a, b = (m.get("evaluation", {}).get("protocol") for m in (metrics_a, metrics_b))
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return
    differ = [f"{key} ({a.get(key)} vs {b.get(key)})" for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)]
    if differ:
        raise DetoxError(f"the two evaluations differ in {'; '.join(differ)}: evaluate both runs the same way "
                         "(detoxrl evaluate RUN --output_dir DIR ...) and compare those")


def compare_runs(run_a: str | Path, run_b: str | Path) -> Group:
    """A rich table of two runs' main metrics side by side, with the difference B − A, and the files the
    evaluations were read from."""
    (metrics_a, source_a), (metrics_b, source_b) = load_metrics(run_a), load_metrics(run_b)
    check_same_protocol(metrics_a, metrics_b)
    check_same_sampling(metrics_a, metrics_b)
    rows = compare_rows(metrics_a, metrics_b)
    name_a, name_b = escape(Path(run_a).name), escape(Path(run_b).name)
    table = Table(title=f"{name_a} vs {name_b}")
    table.add_column("metric")
    table.add_column(f"A: {name_a}", justify="right")
    table.add_column(f"B: {name_b}", justify="right")
    table.add_column("B − A", justify="right")
    for title, section in rows:
        table.add_row(f"[bold]{escape(title)}[/bold]")
        for row in section:
            diff = None if row.a is None or row.b is None else row.b - row.a
            table.add_row(f"  {escape(row.label)}", _cell(row.a, row.metric, counts=row.counts_a),
                          _cell(row.b, row.metric, counts=row.counts_b), _cell(diff, row.metric, signed=True))
        table.add_section()
    sources = [Text((f"{side}: evaluation from {source}" if source else f"{side}: no evaluation")
                    + ("" if has_policy(metrics) or not source else " (the model alone: its reference side only)"))
               for side, source, metrics in (("A", source_a, metrics_a), ("B", source_b, metrics_b))]
    return Group(table, *sources)


def has_policy(metrics: dict) -> bool:
    """Whether an evaluation judged a policy against its reference; ``detoxrl evaluate --model`` without an
    adapter judges the model alone, as the reference side (a run's reference side pairs with it)."""
    return "policy" in metrics.get("evaluation", {}).get("quality", {})


def check_same_sampling(metrics_a: dict, metrics_b: dict) -> None:
    """Refuse two evaluations whose own sampling settings (eval.temperature, eval.top_p, eval.max_new_tokens,
    recorded as ``sampling.set_by_eval``) lead to different sampling: their texts were drawn differently.

    Sampling an evaluation takes over from training (generation.*) is a property of the model judged, so it
    may differ, as before evaluations recorded their sampling.
    """
    a, b = (m.get("evaluation", {}).get("sampling") for m in (metrics_a, metrics_b))
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return
    chosen = dict.fromkeys([*a.get("set_by_eval", {}), *b.get("set_by_eval", {})])
    differ = [f"{key} ({a.get(key)} vs {b.get(key)})" for key in chosen if a.get(key) != b.get(key)]
    if differ:
        raise DetoxError(f"the two evaluations sample differently: {'; '.join(differ)}; evaluate both with the same "
                         "eval.temperature, eval.top_p and eval.max_new_tokens")


def _toxic_prompts(side: dict) -> str:
    count = TOXICITY_PROBABILITY.count(side)
    return "—" if count is None else f"{count[0]}/{count[1]}"


def headline_table(metrics: dict) -> Table:
    """One run's evaluation as the verdict ``train`` and ``evaluate`` end on.

    Per toxicity evaluator, held-out judges first: its toxic prompts before → after and the difference of
    toxicity probability with its 95% CI and p-value. Then the quality guards as policy / reference ratios,
    so a detoxification bought with broken text shows beside it. The reward's own scorer, and a guard that
    a reward term computes, are marked: the run optimised them, so they cannot vouch for it.
    """
    if not has_policy(metrics):
        return model_table(metrics)
    evaluation = metrics.get("evaluation", {})
    model = metrics.get("run", {}).get("model")
    table = Table(title=f"{escape(model)}: reference → policy" if model else "reference → policy")
    table.add_column("metric")
    table.add_column("reference → policy", justify="right")
    table.add_column("change [95% CI]", justify="right")
    table.add_column("p", justify="right")
    m = TOXICITY_PROBABILITY
    evaluators = sorted(evaluation.get("evaluators", {}).items(), key=lambda item: item[1].get("role") != "held-out")
    if evaluators:
        table.add_row(f"[bold]toxic prompts · {m.label}[/bold]")
        for name, ev in evaluators:
            role = ev.get("role", "")
            mark = f" · {TRAINED_ON}" if role == "reward" else ""
            diff = ev.get("difference", {}).get(m.key, {})
            style = {"good": "green", "bad": "red"}.get(verdict(m, diff.get("ci_low"), diff.get("ci_high")))
            relative = ev.get("relative_change", {}).get(m.key, {})
            table.add_row(f"  {escape(name)} ({escape(role)}){mark}",
                          f"{_toxic_prompts(ev.get('reference', {}))} → {_toxic_prompts(ev.get('policy', {}))}",
                          Text(m.format_interval(diff) + _relative_text(relative), style=style or ""),
                          format_p(diff) or "—")
        table.add_section()
    quality, terms = evaluation.get("quality", {}), trained_terms(evaluation)
    guards = [(g, g.value(quality.get("reference", {})), g.value(quality.get("policy", {})))
              for g in QUALITY if g.guard]
    guards = [(g, ref, pol) for g, ref, pol in guards if (ref, pol) != (None, None)]
    if guards:
        table.add_row("[bold]quality guards · policy / reference[/bold]")
        for g, ref, pol in guards:
            ratio = f"×{pol / ref:.2f}" if ref and pol is not None else "—"
            mark = f" · {TRAINED_ON}" if is_reward_term(g, terms) else ""
            table.add_row(f"  {escape(g.name)}{mark}", f"{g.format(ref)} → {g.format(pol)}", ratio, "")
    bars = evaluation.get("bars")
    if bars:
        protocol = evaluation.get("protocol", {})
        table.add_section()
        table.add_row(f"[bold]bars of {escape(str(protocol.get('name')))} v{protocol.get('version')}: "
                      f"{sum(b['holds'] for b in bars)} of {len(bars)} hold[/bold]")
        for b in bars:
            value = "—" if b.get("value") is None else f"{b['value']:.3f}"
            table.add_row(f"  {escape(b['metric'])} {BAR_SYMBOLS.get(b['kind'], b['kind'])} {b['bar']:g}", value,
                          Text("holds" if b["holds"] else "fails", style="green" if b["holds"] else "red"), "")
    return table


BAR_SYMBOLS = {"max_relative_change": "relative change ≤", "min_ratio": "ratio ≥", "max_ratio": "ratio ≤",
               "max": "≤"}


def _relative_text(relative: dict) -> str:
    """The relative change with its bootstrap CI, as a second line of the change cell."""
    if relative.get("value") is None:
        return ""
    interval = (f" [{relative['ci_low']:+.0%}, {relative['ci_high']:+.0%}]"
                if relative.get("ci_low") is not None else "")
    return f"\n{relative['value']:+.0%}{interval} relative"


def model_table(metrics: dict) -> Table:
    """The verdict of a model judged alone (``evaluate --model`` without an adapter): per toxicity evaluator,
    held-out judges first, its toxic prompts, toxicity probability and expected maximum toxicity; then the
    quality guards."""
    evaluation = metrics.get("evaluation", {})
    table = Table(title=escape(metrics.get("run", {}).get("model") or "model"))
    table.add_column("metric")
    table.add_column("model", justify="right")
    evaluators = sorted(evaluation.get("evaluators", {}).items(), key=lambda item: item[1].get("role") != "held-out")
    if evaluators:
        m = TOXICITY_PROBABILITY
        table.add_row(f"[bold]toxic prompts · {m.label} · {EXPECTED_MAX_TOXICITY.label}[/bold]")
        for name, ev in evaluators:
            side = ev.get("reference", {})
            table.add_row(f"  {escape(name)} ({escape(ev.get('role', ''))})",
                          f"{_toxic_prompts(side)} · {m.format(m.value(side))} · "
                          f"{EXPECTED_MAX_TOXICITY.format(EXPECTED_MAX_TOXICITY.value(side))}")
        table.add_section()
    quality = evaluation.get("quality", {}).get("reference", {})
    guards = [(g, g.value(quality)) for g in QUALITY if g.guard and g.value(quality) is not None]
    if guards:
        table.add_row("[bold]quality guards[/bold]")
        for g, value in guards:
            table.add_row(f"  {escape(g.name)}", g.format(value))
    return table
