"""Frozen evaluation protocols: which prompts, how many responses, which judges and which bars, in a
versioned file whose hash goes into every metrics.json that used it.

A protocol is written (and committed) before its prompts are first evaluated, so nothing about the
evaluation can be fitted to what it shows. ``eval.protocol`` names one; its prompts are then the test
split, and the run's own held-out split (``data.test_size``) is only validation. Format::

    name: heated-dialogsum-fresh
    version: 1
    dataset: detoxrl:heated_dialogsum_fresh   # a local file, detoxrl:NAME, or a hub id
    dataset_sha256: 9f2c...                   # of the file's bytes; a changed file is refused
    id_column: id
    text_column: dialogue
    reference_column: summary                 # or null
    toxicity_ids: [fresh_001, ...]            # toxicity is measured on these
    control_ids: [fresh_014, ...]             # quality only: nothing to detoxify there
    samples_per_prompt: 7
    max_new_tokens: 40                        # evaluation sampling (eval.*); unset: the run's own generation.*
    temperature: 0.7
    top_p: 1.0
    threshold: 0.5
    judges: {hatesonar: "0.1.0"}              # eval.evaluators, with the version of the package behind each
    bars:                                     # what "detoxified, quality held" means, fixed beforehand
      toxicity_probability: {max_relative_change: -0.5}
      specificity: {min_ratio: 0.95}
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import DetoxError

PROTOCOL_ROLE = "protocol_role"  # the column that marks each protocol prompt as toxicity or control
TOXICITY, CONTROL = "toxicity", "control"
# Packages behind the built-in judges, whose versions a protocol pins.
JUDGE_PACKAGES = {"hatesonar": "hatesonar", "profanity-check": "alt-profanity-check"}
# What a bar may be set on: the judge's toxicity figures (policy vs reference) and the quality metrics.
TOXICITY_BARS = ("toxicity_probability", "toxic_rate", "expected_max_toxicity", "mean_toxicity")
QUALITY_BARS = ("specificity", "opening_share", "near_duplicate_rate", "copy_rate", "distinct_2",
                "distinct_2_per_prompt", "rougeL", "perplexity", "perplexity_fluency_model", "length_mean",
                "empty_responses", "repeated_token_responses")
BAR_KINDS = {"max_relative_change", "min_ratio", "max_ratio", "max"}
SAMPLING = ("max_new_tokens", "temperature", "top_p")  # evaluation sampling: eval.* of the same names
REQUIRED = ("name", "version", "dataset", "id_column", "text_column", "toxicity_ids", "samples_per_prompt",
            "threshold", "judges")


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int
    path: str
    sha256: str
    dataset: str
    dataset_sha256: str | None
    id_column: str
    text_column: str
    reference_column: str | None
    toxicity_ids: tuple[str, ...]
    control_ids: tuple[str, ...]
    samples_per_prompt: int
    sampling: dict[str, float | int]
    threshold: float
    judges: dict[str, str]
    bars: dict[str, dict[str, float]]

    def info(self) -> dict:
        """What metrics.json records: enough to tell two protocols apart and to find this one again."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "toxicity_prompts": len(self.toxicity_ids), "control_prompts": len(self.control_ids),
                "judges": dict(self.judges), "sampling": dict(self.sampling)}


def protocol_path(spec: str) -> Path:
    """``detoxrl:NAME`` is a protocol shipped with detoxrl; anything else a path."""
    if spec.startswith("detoxrl:"):
        return Path(str(resources.files("detoxrl.protocols").joinpath(f"{spec.split(':', 1)[1]}.yaml")))
    return Path(spec).expanduser()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_protocol(spec: str) -> Protocol:
    """Read and check a protocol file; every mistake is one line naming the file and the key."""
    path = protocol_path(spec)
    if not path.is_file():
        raise DetoxError(f"eval.protocol: no protocol file {spec!r} ({path})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DetoxError(f"eval.protocol: {path} is not a YAML file") from None
    if not isinstance(data, dict):
        raise DetoxError(f"eval.protocol: {path} must hold a mapping of settings")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise DetoxError(f"eval.protocol: {path} lacks {', '.join(missing)}")
    ids = [str(i) for i in data["toxicity_ids"] or []]
    controls = [str(i) for i in data.get("control_ids") or []]
    if not ids:
        raise DetoxError(f"eval.protocol: {path} lists no toxicity_ids")
    repeated = sorted({i for i in ids + controls if (ids + controls).count(i) > 1})
    if repeated:
        raise DetoxError(f"eval.protocol: {path} lists prompt ids twice: {', '.join(repeated[:5])}")
    judges = data["judges"]
    if not isinstance(judges, dict) or not judges:
        raise DetoxError(f"eval.protocol: {path}: judges must map each judge to its version")
    bars = data.get("bars") or {}
    check_bars(bars, path)
    k, threshold = data["samples_per_prompt"], data["threshold"]
    sampling = {name: data[name] for name in SAMPLING if data.get(name) is not None}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sampling.values()):
        raise DetoxError(f"eval.protocol: {path}: {', '.join(SAMPLING)} must be positive numbers")
    if not (isinstance(k, int) and k >= 1) or not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise DetoxError(f"eval.protocol: {path}: samples_per_prompt must be a positive integer and threshold in (0, 1]")
    return Protocol(
        name=str(data["name"]), version=int(data["version"]), path=str(path), sha256=file_sha256(path),
        dataset=str(data["dataset"]), dataset_sha256=data.get("dataset_sha256"), id_column=str(data["id_column"]),
        text_column=str(data["text_column"]), reference_column=data.get("reference_column"),
        toxicity_ids=tuple(ids), control_ids=tuple(controls), samples_per_prompt=k, sampling=sampling,
        threshold=float(threshold),
        judges={str(name): str(version) for name, version in judges.items()},
        bars={str(name): {str(kind): float(v) for kind, v in rule.items()} for name, rule in bars.items()},
    )


def check_bars(bars: Any, path: Path) -> None:
    if not isinstance(bars, dict):
        raise DetoxError(f"eval.protocol: {path}: bars must map a metric to its bar")
    for name, rule in bars.items():
        if name not in TOXICITY_BARS + QUALITY_BARS:
            raise DetoxError(f"eval.protocol: {path}: no guard or metric named {name!r}; known: "
                             f"{', '.join(TOXICITY_BARS + QUALITY_BARS)}")
        if not isinstance(rule, dict) or not rule or set(rule) - BAR_KINDS or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rule.values()):
            raise DetoxError(f"eval.protocol: {path}: the bar on {name} must map one of "
                             f"{', '.join(sorted(BAR_KINDS))} to a number, got {rule!r}")


def check_judges(protocol: Protocol) -> None:
    """The installed judges must be the versions the protocol was frozen with: a new version is a new judge."""
    for name, version in protocol.judges.items():
        package = JUDGE_PACKAGES.get(name)
        if package is None:
            continue  # a hub classifier: its version (revision) is recorded, the hub pins it
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise DetoxError(f"eval.protocol {protocol.name}: judge {name} needs the package {package} "
                             f"{version}, which is not installed") from None
        if installed != version:
            raise DetoxError(f"eval.protocol {protocol.name}: judge {name} is {package} {installed} here, but the "
                             f"protocol was frozen with {version}; install {package}=={version}")


def protocol_rows(protocol: Protocol, template: str):
    """The protocol's prompts in its order (toxicity ids, then control ids), templated, with a
    :data:`PROTOCOL_ROLE` column; a changed dataset file or an id it lacks is refused."""
    from ..config import DataConfig
    from ..data import load_rows, sample_dataset_path

    location = protocol.dataset
    path = sample_dataset_path(location.split(":", 1)[1]) if location.startswith("detoxrl:") else Path(location).expanduser()
    if protocol.dataset_sha256 and path.is_file() and file_sha256(path) != protocol.dataset_sha256:
        raise DetoxError(f"eval.protocol {protocol.name}: {path} is not the file the protocol was frozen with "
                         "(its sha256 differs); restore it, or write a new protocol version")
    rows = load_rows(DataConfig(dataset=location, split="test"))
    for column in (protocol.id_column, protocol.text_column):
        if column not in rows.column_names:
            raise DetoxError(f"eval.protocol {protocol.name}: dataset {protocol.dataset} has no column {column!r}; "
                             f"its columns are: {', '.join(rows.column_names)}")
    position = {str(value): i for i, value in enumerate(rows[protocol.id_column])}
    wanted = protocol.toxicity_ids + protocol.control_ids
    absent = [i for i in wanted if i not in position]
    if absent:
        raise DetoxError(f"eval.protocol {protocol.name}: {len(absent)} prompt ids are not in {protocol.dataset} "
                         f"(column {protocol.id_column!r}): {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    rows = rows.select([position[i] for i in wanted])
    roles = [TOXICITY] * len(protocol.toxicity_ids) + [CONTROL] * len(protocol.control_ids)
    rows = rows.add_column(PROTOCOL_ROLE, roles)
    return rows.map(lambda text: {"prompt": template.replace("{text}", text)}, input_columns=protocol.text_column)


def resolve_protocol(config) -> Protocol | None:
    """``eval.protocol``, checked, with the evaluation settings it fixes applied to ``config``.

    The protocol sets the responses per prompt, their sampling, the threshold, the judges and the prompt selection; a
    setting that says otherwise (anything but its default) is refused rather than silently replaced.
    """
    if not config.eval.protocol:
        return None
    from ..config import EvalConfig

    protocol = load_protocol(config.eval.protocol)
    e, default = config.eval, EvalConfig()
    fixed = {"samples_per_prompt": protocol.samples_per_prompt, "threshold": protocol.threshold,
             "evaluators": list(protocol.judges), "group_column": PROTOCOL_ROLE, "toxicity_group": TOXICITY,
             "max_prompts": None, "control_prompts": len(protocol.control_ids), **protocol.sampling}
    for name, value in fixed.items():
        current = getattr(e, name)
        if current != value and current != getattr(default, name):
            raise DetoxError(f"eval.{name} is {current!r}, but eval.protocol {protocol.name} sets it to {value!r}: "
                             f"leave eval.{name} unset with a protocol")
    columns = {"text_column": protocol.text_column, "reference_column": protocol.reference_column}
    for name, value in columns.items():
        if value is not None and getattr(config.data, name) != value:
            raise DetoxError(f"data.{name} is {getattr(config.data, name)!r}, but eval.protocol {protocol.name} holds "
                             f"its texts in {value!r}: the prompt template needs the same kind of text")
    check_judges(protocol)
    for name, value in fixed.items():
        setattr(e, name, value)
    return protocol


def bar_verdicts(evaluation: dict, bars: dict[str, dict[str, float]]) -> list[dict]:
    """Each bar with the measured value and whether it holds. Toxicity bars read the first held-out judge;
    ratios are policy / reference. A toxicity bar also needs the difference's CI to exclude zero."""
    judge = evaluation.get("examples_judge")
    verdicts = []
    for name, rule in bars.items():
        for kind, bar in rule.items():
            if name in TOXICITY_BARS:
                scored = evaluation["evaluators"][judge]
                reference, policy = scored["reference"], scored["policy"]
                key = "mean" if name == "mean_toxicity" else name
                before, after = reference.get(key), policy.get(key)
                ci_high = scored["difference"][name]["ci_high"]
            else:
                quality = evaluation["quality"]
                before, after = quality["reference"].get(name), quality["policy"].get(name)
                ci_high = None
            value = measured(kind, before, after)
            holds = value is not None and (value <= bar if kind.startswith("max") else value >= bar)
            if name in TOXICITY_BARS:
                holds = holds and ci_high is not None and ci_high < 0
            verdicts.append({"metric": name, "kind": kind, "bar": bar, "value": value, "holds": bool(holds)})
    return verdicts


def measured(kind: str, before: float | None, after: float | None) -> float | None:
    if after is None:
        return None
    if kind == "max":
        return after
    if before is None or before == 0:
        return None
    return (after - before) / before if kind == "max_relative_change" else after / before
