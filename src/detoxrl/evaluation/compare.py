"""Side-by-side comparison of two evaluated runs (their ``metrics.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from detoxrl.errors import DetoxError

Row = tuple[str, float | None, float | None]


def load_metrics(run_dir: str | Path) -> dict:
    """Read ``<run_dir>/metrics.json``; a missing or broken file is a user error."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetoxError(f"no metrics.json in {run_dir}: run `detoxrl evaluate` on it first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetoxError(f"cannot read {path}: {exc}") from None
    if not isinstance(metrics, dict):
        raise DetoxError(f"cannot read {path}: expected a JSON object")
    return metrics


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _sections(metrics: dict) -> dict[str, dict[str, float | None]]:
    """The comparable numbers of one run, grouped into titled sections of label -> value."""
    evaluation = metrics.get("evaluation", {})
    sections: dict[str, dict[str, float | None]] = {}
    for name, ev in evaluation.get("evaluators", {}).items():
        sections[f"toxicity · {name}"] = {
            f"{metric} ({side})": _number(ev.get(side, {}).get(key))
            for metric, key in (("toxic rate", "toxic_rate"), ("mean toxicity", "mean"))
            for side in ("reference", "policy")
        }
    quality = evaluation.get("quality", {})
    sections["quality"] = {f"{key} ({side})": _number(value)
                           for side in ("reference", "policy")
                           for key, value in quality.get(side, {}).items() if _number(value) is not None}
    sections["training"] = {key: _number(value) for key, value in metrics.get("train", {}).items()
                            if _number(value) is not None}
    return {title: rows for title, rows in sections.items() if rows}


def compare_rows(metrics_a: dict, metrics_b: dict) -> list[tuple[str, list[Row]]]:
    """Per section, (label, value in A, value in B) over the union of both runs' metrics.

    A metric only one run has still appears, with ``None`` for the other, so a
    missing evaluator is visible rather than silently dropped.
    """
    a, b = _sections(metrics_a), _sections(metrics_b)
    out = []
    for title in dict.fromkeys([*a, *b]):
        rows_a, rows_b = a.get(title, {}), b.get(title, {})
        out.append((title, [(label, rows_a.get(label), rows_b.get(label)) for label in dict.fromkeys([*rows_a, *rows_b])]))
    return out


def _cell(x: float | None, signed: bool = False) -> str:
    return "—" if x is None else f"{x:+.4g}" if signed else f"{x:.4g}"


def compare_runs(run_a: str | Path, run_b: str | Path) -> Table:
    """A rich table of two runs' main metrics side by side, with the difference B − A."""
    rows = compare_rows(load_metrics(run_a), load_metrics(run_b))
    name_a, name_b = escape(Path(run_a).name), escape(Path(run_b).name)
    table = Table(title=f"{name_a} vs {name_b}")
    table.add_column("metric")
    table.add_column(f"A: {name_a}", justify="right")
    table.add_column(f"B: {name_b}", justify="right")
    table.add_column("B − A", justify="right")
    for title, section in rows:
        table.add_row(f"[bold]{escape(title)}[/bold]")
        for label, x, y in section:
            diff = None if x is None or y is None else y - x
            table.add_row(f"  {escape(label)}", _cell(x), _cell(y), _cell(diff, signed=True))
        table.add_section()
    return table
