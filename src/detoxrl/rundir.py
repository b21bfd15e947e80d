"""The run directory: what a run writes where, how it is written, and how a finished run is recognised.

Layout of ``detoxrl train --output_dir RUN``::

    config.yaml        the resolved configuration (written first)
    checkpoints/       step-N/ (atomic, the last save_total_limit kept)
    logs/              TensorBoard event files
    history.jsonl      per-step statistics, rewritten after every step
    adapter/           LoRA adapter + value head (safetensors) + tokenizer
    report.html, samples.csv, responses.jsonl
                       the end-of-training evaluation
    eval/              ``detoxrl evaluate RUN``: its own report, samples, responses and metrics.json
    resumes.jsonl      settings changed by a resume with --resume_with_changes (absent otherwise)
    metrics.json       written last: a run without it did not finish

Every file is written to a temporary name in the same directory and renamed into place, so a crash,
a kill or a full disk leaves the old file or the new one, never a truncated one. What is written gets the
mode the user's umask gives a new file (0644 and 0755 under umask 0022), though temporary files (and
safetensors' own writer) start private.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DetoxError

# checkpoints/step-NNNNNNN/ (detoxrl.rl.checkpoint writes them); the marker file is written last.
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_MARKER = "state.json"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run (or of an ``eval/`` directory, which holds the evaluation's files)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def history(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def metrics(self) -> Path:
        """Written last: its presence marks a finished run."""
        return self.path / "metrics.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def samples(self) -> Path:
        return self.path / "samples.csv"

    @property
    def responses(self) -> Path:
        return self.path / "responses.jsonl"

    @property
    def eval(self) -> Path:
        """Where ``detoxrl evaluate`` writes by default."""
        return self.path / "eval"

    @property
    def resumes(self) -> Path:
        """Settings changed by ``--resume_with_changes``, one JSON object per such resume."""
        return self.path / "resumes.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def is_finished(self) -> bool:
        return self.metrics.is_file()


# ----------------------------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and everything under a directory) the mode a plain ``open`` or ``mkdir`` would have:
    0o666 or 0o777 less the umask."""
    path, mask = Path(path), current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise DetoxError(f"could not write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes null; NumPy scalars become Python numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # a NumPy or torch scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def json_ready(data: Any) -> Any:
    """``data`` with every non-finite float replaced by null, for strict JSON."""
    if isinstance(data, Mapping):
        return {str(k): json_ready(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(v) for v in data]
    return finite_or_none(data)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented, strict JSON (non-finite floats as null), written atomically."""
    return atomic_write_text(path, json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")


def atomic_write_dir(target: str | Path, write: Callable[[Path], None], what: str | None = None) -> Path:
    """Let ``write`` fill a staging directory next to ``target``, then rename it to ``target``.

    An existing ``target`` is replaced only once the new one is complete. ``what`` names the contents in
    the error message ("could not save the adapter to ...").
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        apply_umask(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        action = f"save {what} to" if what else "write"
        raise DetoxError(f"could not {action} {target}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

# ----------------------------------------------------------------------------------------------- history


def write_history(history: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Rewrite the per-step log, one JSON object per line, non-finite values as null."""
    lines = (json.dumps(json_ready(row), allow_nan=False) + "\n" for row in history)
    return atomic_write_text(path, "".join(lines))


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The per-step log; an absent file is an empty history, an unreadable one a user error."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetoxError(f"cannot read {path}: {exc}") from None


# ----------------------------------------------------------------------------------------------- resuming

# Settings a resume may change without a word: they decide where and how the run reports, not what it trains.
RESUME_MAY_CHANGE = ("output_dir", "report_to", "save_steps", "save_total_limit", "threads", "eval.")


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"rl": {"steps": 2}}`` -> ``{"rl.steps": 2}``."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """The settings that decide a run's result and differ between its saved config and a resume's:
    ``{"rl.learning_rate": [old, new]}``."""
    a, b = flat_settings(saved), flat_settings(new)
    return {key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and not key.startswith(RESUME_MAY_CHANGE)}


def check_resume(run: RunDir, saved: Mapping[str, Any], new: Mapping[str, Any], with_changes: bool) -> dict:
    """Refuse a resume that would change what the run trains, naming each change, unless ``with_changes``;
    then the changes are recorded in ``resumes.jsonl`` and returned."""
    changed = changed_settings(saved, new)
    if changed and not with_changes:
        listed = ", ".join(f"{key} ({old!r} -> {value!r})" for key, (old, value) in changed.items())
        raise DetoxError(f"--resume would change settings that decide the result: {listed}; resume with the saved "
                         "settings, or add --resume_with_changes to continue anyway (recorded in resumes.jsonl)")
    if changed:
        previous = run.resumes.read_text(encoding="utf-8") if run.resumes.is_file() else ""
        atomic_write_text(run.resumes, previous + json.dumps(json_ready({"changed": changed})) + "\n")
    return changed


# ----------------------------------------------------------------------------------------------- a run's lifecycle


@contextlib.contextmanager
def run_lifecycle(config, resume: bool = False, resume_with_changes: bool = False, main: bool = True,
                  barrier: Callable[[], None] = lambda: None) -> Iterator[RunDir]:
    """What every command that makes a run (train, sft) does around its work, written once.

    Before: a resume is checked against the saved settings (:func:`check_resume`); the output directory
    is prepared (a finished or foreign run is refused) and the settings are saved. After a failure
    (also Ctrl-C): what this run wrote is removed, unless a checkpoint or a trained adapter is there to
    continue from, so the same command can run again. The caller ends with :func:`finish`. ``main``
    and ``barrier``: only the main process writes; the others wait for it.
    """
    out = RunDir(config.output_dir)
    if resume and out.config.is_file() and not out.is_finished():
        from .config import load_run_config

        check_resume(out, load_run_config(out.config).to_dict(), config.to_dict(), resume_with_changes)
    created, was_empty = prepare_output_dir(out.path, resume) if main else (False, False)
    barrier()
    try:
        if main:
            config.save(out.config)
        yield out
    except BaseException:
        worth_keeping = list_checkpoints(out.checkpoints) or out.adapter.is_dir()
        if main and (created or was_empty) and not worth_keeping:
            remove_partial_run(out.path, keep_directory=not created)
        raise


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / CHECKPOINT_MARKER).is_file())


def finish(out: RunDir, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json, last: its presence marks the run finished."""
    return atomic_write_json(out.metrics, metrics)


# ----------------------------------------------------------------------------------------------- the directory


def prepare_output_dir(out: str | Path, resume: bool) -> tuple[bool, bool]:
    """Refuse to overwrite a finished or foreign run; create the directory and check that it is writable.

    Returns (created, was_empty): whether the directory was created here, and whether it existed but was
    empty. Both tell :func:`remove_partial_run` what a failed run may remove.
    """
    out = Path(out)
    if RunDir(out).is_finished():
        raise DetoxError(f"{out} already holds a finished run; choose another --output_dir")
    if out.exists() and not out.is_dir():
        raise DetoxError(f"--output_dir {out} is a file, not a directory")
    created = not out.exists()
    try:
        was_empty = not created and not any(out.iterdir())
    except OSError as exc:
        raise DetoxError(f"cannot read output directory {out}: {exc.strerror or exc}") from exc
    if not created and not resume and not was_empty:
        raise DetoxError(f"{out} is not empty; pass --resume to continue its run or choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DetoxError(f"cannot write to output directory {out}: {exc.strerror or exc}") from exc
    return created, was_empty


def remove_partial_run(out: str | Path, keep_directory: bool) -> None:
    """Delete what a failed run wrote: the whole directory, or only its contents (best effort)."""
    out = Path(out)
    if not keep_directory:
        shutil.rmtree(out, ignore_errors=True)
        return
    try:
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- finished runs


@dataclass
class Run:
    """A finished run: its directory, resolved settings and final metrics."""

    dir: RunDir
    config: Any  # detoxrl.config.Config
    metrics: dict

    @property
    def path(self) -> Path:
        return self.dir.path

    def load_policy(self):
        """The run's base model with its trained adapter (a :class:`detoxrl.policy.Policy`)."""
        from .policy import load_policy

        return load_policy(self.config.model, adapter=self.dir.adapter, device=self.config.device)


def load_run(run_dir: str | Path) -> Run:
    """Open a finished run; a directory that is not one, or a run that did not finish, is an error."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DetoxError(f"run directory {run.path} does not exist" if not run.path.exists()
                         else f"{run.path} is a file, not a run directory")
    if not run.config.is_file():
        raise DetoxError(f"{run.path} is not a detoxrl run directory (config.yaml is missing)")
    if not run.is_finished():
        raise DetoxError(f"the run in {run.path} did not finish (metrics.json is missing); use a finished run "
                         f"(an interrupted train run continues with: detoxrl train --output_dir {run.path} --resume)")
    if not (run.adapter / "adapter_config.json").is_file():
        raise DetoxError(f"{run.path} has no adapter (adapter/adapter_config.json is missing)")
    try:
        metrics = json.loads(run.metrics.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetoxError(f"cannot read {run.metrics}: {exc}") from None
    from .config import load_run_config

    return Run(run, load_run_config(run.config), metrics)
