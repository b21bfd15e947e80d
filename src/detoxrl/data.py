"""Prompts: a hub dataset or a local file, filtered by length, templated, split train/test."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from datasets import Dataset, load_dataset

from .config import DataConfig
from .errors import DetoxError
from .hub import OFFLINE_HINT

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAMPLE_DATASET = "detoxrl:heated_dialogsum"


def sample_dataset_path() -> Path:
    """The DialogSum-format sample set shipped with detoxrl (no network needed)."""
    return Path(str(resources.files("detoxrl.assets").joinpath("heated_dialogsum.jsonl")))


def load_rows(config: DataConfig) -> Dataset:
    name = config.dataset
    if name == SAMPLE_DATASET:
        name = str(sample_dataset_path())
    path = Path(name).expanduser()
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DetoxError(f"dataset file not found: {path}")
        try:
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except UnicodeDecodeError:
            raise DetoxError(f"dataset file {path} is not UTF-8 text")
        except Exception as exc:  # datasets wraps parse errors in many types
            raise DetoxError(f"cannot read dataset file {path}: {str(exc).strip().splitlines()[0]}") from exc
    if path.exists():
        raise DetoxError(f"dataset file {path} has an unsupported format; use .jsonl, .csv or .parquet")
    try:
        return load_dataset(name, split=config.split)
    except Exception as exc:
        raise DetoxError(
            f"could not load dataset {name!r} (split {config.split!r}): not a local file, and not available "
            f"from the dataset hub (unreachable or unknown); {OFFLINE_HINT}"
        ) from exc


def build_splits(config: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Filter by length (min_chars < len <= max_chars), add ``prompt``, split with a fixed seed."""
    rows = load_rows(config)
    if config.text_column not in rows.column_names:
        raise DetoxError(
            f"dataset has no column {config.text_column!r} (data.text_column); its columns are: "
            f"{', '.join(rows.column_names)}"
        )
    if config.reference_column and config.reference_column not in rows.column_names:
        config.reference_column = None
    rows = rows.filter(
        lambda text: text is not None and config.min_chars < len(text) <= config.max_chars,
        input_columns=config.text_column,
    )
    if len(rows) < 2:
        raise DetoxError(
            f"only {len(rows)} rows are left after keeping texts with {config.min_chars} < length <= "
            f"{config.max_chars} characters; change data.min_chars/max_chars or the dataset"
        )
    template = config.prompt_template
    rows = rows.map(lambda text: {"prompt": template.replace("{text}", text)}, input_columns=config.text_column)
    split = rows.train_test_split(test_size=config.test_size, shuffle=True, seed=seed)
    return split["train"], split["test"]
