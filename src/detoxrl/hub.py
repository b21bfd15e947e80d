"""Loading from the Hugging Face hub or a local path, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import DetoxError

T = TypeVar("T")

OFFLINE_HINT = "use a local path, or the offline preset: detoxrl train --preset smollm2-offline"


# A directory that holds none of these is not something from_pretrained can load.
MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")


def hub_offline() -> bool:
    """True when huggingface_hub runs in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in (".gguf", ".jsonl", ".csv", ".parquet")


def load_pretrained(loader: Callable[..., T], name: str, what: str, **kwargs: Any) -> T:
    """Call ``loader(name, **kwargs)``; turn "not found" and "hub unreachable" into one clear line."""
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise DetoxError(f"{what} not found: {name} does not exist")
    gguf_file = kwargs.get("gguf_file")
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise DetoxError(f"{what} not found: {path / gguf_file} does not exist")
    if path.is_dir() and not gguf_file and not any((path / f).is_file() for f in MODEL_FILES):
        raise DetoxError(
            f"could not load {what} from {name}: the directory holds no model (no config.json); give a hub id "
            "or a directory written by save_pretrained"
        )
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if path.exists():
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise DetoxError(f"could not load {what} from {name}: {first}") from exc
        if hub_offline():
            raise DetoxError(
                f"could not load {what} {name!r}: not a local path, and the model hub is unreachable "
                f"(offline mode, HF_HUB_OFFLINE=1); {OFFLINE_HINT}"
            ) from exc
        if any(s in text for s in ("offline", "connect", "resolve", "Connection", "couldn't connect", "Max retries")):
            raise DetoxError(f"could not load {what} {name!r}: the model hub is unreachable; {OFFLINE_HINT}") from exc
        raise DetoxError(
            f"could not load {what} {name!r}: not a local path and not found on the hub (or the hub is "
            f"unreachable); {OFFLINE_HINT}"
        ) from exc
