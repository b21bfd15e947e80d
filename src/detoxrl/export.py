"""``detoxrl export RUN OUT``: a finished run's adapter, or the full merged model, for use without detoxrl.

The adapter export is a PEFT directory whose adapter_config.json names the base as the user gave
it; ``--merge`` folds the LoRA into the base weights (peft's ``merge_and_unload``) and saves a plain
transformers model (safetensors) with its tokenizer and chat template. Both carry a model card.
The export is written next to OUT and renamed into place, so OUT is complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import DetoxError
from .rundir import Run, load_run
from .modelcard import CARD_FILE, write_model_card
from .policy import portable_base
from .rundir import atomic_write_dir


def write_adapter(run: Run, target: Path) -> None:
    """The run's adapter files, with the base recorded portably (runs saved before that recorded a cache path)."""
    shutil.copytree(run.dir.adapter, target, ignore=shutil.ignore_patterns(CARD_FILE, ".*"))
    adapter_config = target / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = portable_base(run.config.model)
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def write_merged(run: Run, target: Path) -> None:
    """Base + LoRA as one transformers model, generating as ``detoxrl generate`` does."""
    try:
        policy = run.load_policy()
    except DetoxError as exc:
        raise DetoxError(f"cannot merge {run.path}: {exc}") from exc
    model = policy.model.merge_and_unload()
    model.generation_config.eos_token_id = policy.eos_token_ids
    model.generation_config.pad_token_id = policy.tokenizer.pad_token_id
    model.save_pretrained(target)
    # right for T5 (relative positions), left otherwise; saved only as an init argument, which plain
    # transformers then applies when it loads the export (setting the attribute alone is not saved)
    policy.tokenizer.padding_side = policy.tokenizer.init_kwargs["padding_side"] = policy.padding_side
    policy.tokenizer.save_pretrained(target)


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Upload an export to a model hub repository (created when missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload from detoxrl export")
    except Exception as exc:  # network, authentication and permission errors all leave the export in place
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetoxError(f"could not push {folder} to {repo_id}: {first} (the export is kept; log in with "
                         "`hf auth login` or set HF_TOKEN)") from exc
    return str(url)


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, hub_repo: str | None = None,
               private: bool = False) -> Path:
    """Export a finished run's adapter (or, with ``merge``, the merged model) to ``out``; returns ``out``."""
    run = load_run(run_dir)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DetoxError(f"export target {target} exists and is not empty; choose a new or empty directory")
    if run.dir.adapter.resolve() in (target.resolve(), *target.resolve().parents):
        raise DetoxError(f"export target {target} is inside the run's adapter directory; choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        (write_merged if merge else write_adapter)(run, staging)
        write_model_card(run.path, staging, run.metrics)

    atomic_write_dir(target, write)
    if hub_repo:
        push_to_hub(target, hub_repo, private)
    return target
