"""Side-by-side comparison of two evaluated runs.

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

# A side's toxicity summary (see stats.side_summary): key, label, and the count shown beside the value:
# toxic_<unit> gives "toxic/all unit" next to a rate, a bare unit "all unit" next to a mean.
TOXICITY_ROWS = (("toxicity_probability", "toxicity probability", "toxic_prompts"),
                 ("expected_max_toxicity", "expected max toxicity", "prompts"),
                 ("toxic_rate", "toxic rate", "toxic_samples"),
                 ("mean", "mean toxicity", None))


class Row(NamedTuple):
    """One metric of runs A and B; ``counts_*`` are the toxic events behind it, e.g. "3/10 prompts"."""

    label: str
    a: float | None
    b: float | None
    counts_a: str | None = None
    counts_b: str | None = None


Value = tuple[float | None, str | None]  # a metric and its counts


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


def _counts(side: dict, count: str | None) -> str | None:
    """"3/10 prompts" (``toxic_prompts``) or "10 prompts" (``prompts``); None when the metrics lack it."""
    if count is None:
        return None
    unit = count.removeprefix("toxic_")
    total = side.get(unit)
    if not isinstance(total, int):
        return None
    if count == unit:
        return f"{total} {unit}"
    toxic = side.get(count)
    return f"{toxic}/{total} {unit}" if isinstance(toxic, int) else None


def _toxicity(ev: dict) -> dict[str, Value]:
    """One evaluator's toxicity metrics of both sides; a metric neither side has is left out."""
    rows = {f"{label} ({side})": (_number(ev.get(side, {}).get(key)), _counts(ev.get(side, {}), count))
            for key, label, count in TOXICITY_ROWS for side in ("reference", "policy")}
    return {label: value for label, value in rows.items() if value != (None, None)}


def _sections(metrics: dict) -> dict[str, dict[str, Value]]:
    """The comparable numbers of one run, grouped into titled sections of label -> (value, counts)."""
    evaluation = metrics.get("evaluation", {})
    sections = {f"toxicity · {name}": _toxicity(ev) for name, ev in evaluation.get("evaluators", {}).items()}
    quality = evaluation.get("quality", {})
    sections["quality"] = {f"{key} ({side})": (_number(value), None)
                           for side in ("reference", "policy")
                           for key, value in quality.get(side, {}).items() if _number(value) is not None}
    sections["training"] = {key: (_number(value), None) for key, value in metrics.get("train", {}).items()
                            if _number(value) is not None}
    return {title: rows for title, rows in sections.items() if rows}


def compare_rows(metrics_a: dict, metrics_b: dict) -> list[tuple[str, list[Row]]]:
    """Per section, a :class:`Row` per metric over the union of both runs' metrics.

    A metric only one run has still appears, with ``None`` for the other, so a
    missing evaluator is visible rather than silently dropped.
    """
    a, b = _sections(metrics_a), _sections(metrics_b)
    out = []
    for title in dict.fromkeys([*a, *b]):
        rows_a, rows_b = a.get(title, {}), b.get(title, {})
        rows = []
        for label in dict.fromkeys([*rows_a, *rows_b]):
            (x, counts_x), (y, counts_y) = rows_a.get(label, (None, None)), rows_b.get(label, (None, None))
            rows.append(Row(label, x, y, counts_x, counts_y))
        out.append((title, rows))
    return out


def _cell(x: float | None, signed: bool = False, counts: str | None = None) -> str:
    text = "—" if x is None else f"{x:+.4g}" if signed else f"{x:.4g}"
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
            table.add_row(f"  {escape(row.label)}", _cell(row.a, counts=row.counts_a),
                          _cell(row.b, counts=row.counts_b), _cell(diff, signed=True))
        table.add_section()
    sources = [Text(f"{side}: evaluation from {source}" if source else f"{side}: no evaluation")
               for side, source in (("A", source_a), ("B", source_b))]
    return Group(table, *sources)
