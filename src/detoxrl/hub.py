"""Loading from the Hugging Face hub or a local path, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import DetoxError

T = TypeVar("T")

OFFLINE_HINT = "use a local path, or the offline preset: detoxrl train --preset smollm2-offline"


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in (".gguf", ".jsonl", ".csv", ".parquet")


def load_pretrained(loader: Callable[..., T], name: str, what: str, **kwargs: Any) -> T:
    """Call ``loader(name, **kwargs)``; turn "not found" and "hub unreachable" into one clear line."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise DetoxError(f"{what} not found: {name} does not exist")
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if Path(name).expanduser().exists():
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise DetoxError(f"could not load {what} from {name}: {first}") from exc
        if any(s in text for s in ("offline", "connect", "resolve", "Connection", "couldn't connect", "Max retries")):
            raise DetoxError(f"could not load {what} {name!r}: the model hub is unreachable; {OFFLINE_HINT}") from exc
        raise DetoxError(
            f"could not load {what} {name!r}: not a local path and not found on the hub (or the hub is "
            f"unreachable); {OFFLINE_HINT}"
        ) from exc
