"""Prompts: a hub dataset or a local file, filtered by length, templated, split train/test."""

from __future__ import annotations

import codecs
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


def check_text_file(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse an empty or non-UTF-8 text file up front (pyarrow would accept the bytes and fail later)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, blank = 0, 1, True
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                start = offset - (len(exc.object) - len(chunk))  # file offset of exc.object[0]
                line += chunk[: max(0, exc.start + start - offset)].count(b"\n")
                raise DetoxError(
                    f"dataset file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{start + exc.start}, line {line}); convert it to UTF-8"
                ) from None
            if not chunk:
                break
            blank = blank and not text.strip()
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
    if blank:
        raise DetoxError(f"dataset file {path} is empty")


def first_message(exc: BaseException) -> str:
    """The first informative line of an exception or of what caused it (datasets wraps the real error)."""
    while exc is not None:
        text = str(exc).strip()
        if text and not text.startswith("An error occurred while generating the dataset"):
            return text.splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return "unreadable"


def load_rows(config: DataConfig) -> Dataset:
    name = config.dataset
    if name == SAMPLE_DATASET:
        name = str(sample_dataset_path())
    path = Path(name).expanduser()
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DetoxError(f"dataset file not found: {path}")
        if LOCAL_FORMATS[path.suffix] != "parquet":
            check_text_file(path)
        elif path.stat().st_size == 0:
            raise DetoxError(f"dataset file {path} is empty")
        try:
            rows = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except UnicodeDecodeError:
            raise DetoxError(f"dataset file {path} is not UTF-8 text")
        except Exception as exc:  # datasets wraps parse errors in many types
            if "corresponds to no data" in str(exc):  # e.g. a CSV file with only a header
                raise DetoxError(f"dataset file {path} holds no rows") from exc
            raise DetoxError(f"cannot read dataset file {path}: {first_message(exc)}") from exc
        if len(rows) == 0:
            raise DetoxError(f"dataset file {path} holds no rows")
        return rows
    if path.is_dir():
        raise DetoxError(f"dataset path {path} is a directory; give a .jsonl, .csv or .parquet file")
    if path.exists():
        raise DetoxError(
            f"dataset file {path} has an unsupported format ({path.suffix or 'no extension'}); "
            "use .jsonl, .csv or .parquet"
        )
    if name.startswith((".", "/", "~")):  # a path, not a hub id
        raise DetoxError(f"dataset file not found: {path}")
    try:
        return load_dataset(name, split=config.split)
    except Exception as exc:
        raise DetoxError(
            f"could not load dataset {name!r} (split {config.split!r}): not a local file, and not available "
            f"from the dataset hub (unreachable or unknown); {OFFLINE_HINT}"
        ) from exc


def check_text_column(rows: Dataset, column: str, setting: str, dataset: str) -> None:
    """Every value of ``column`` must be a string: name the first row (1-based, a CSV header not counted) that is not."""
    feature = rows.features[column]
    if getattr(feature, "dtype", None) in ("string", "large_string") and rows.data.column(column).null_count == 0:
        return  # typed as text with no nulls: nothing to look at row by row
    for number, value in enumerate(rows[column], start=1):
        if not isinstance(value, str):
            what = "is empty (null)" if value is None else f"holds {value!r} ({type(value).__name__}), not text"
            raise DetoxError(f"dataset {dataset} row {number}: {setting} {column!r} {what}; every row needs text there")


def build_splits(config: DataConfig) -> tuple[Dataset, Dataset]:
    """Filter by length (min_chars < len <= max_chars), add ``prompt``, split with ``split_seed``.

    The split seed is not the run's seed, so runs with different training seeds share their test prompts.

    ``config`` is not changed: a ``reference_column`` the dataset lacks is simply absent from the rows, so
    callers check ``column in rows.column_names``.
    """
    rows = load_rows(config)
    if config.text_column not in rows.column_names:
        raise DetoxError(
            f"dataset has no column {config.text_column!r} (data.text_column); its columns are: "
            f"{', '.join(rows.column_names)}"
        )
    check_text_column(rows, config.text_column, "data.text_column", config.dataset)
    if config.reference_column and config.reference_column in rows.column_names:
        check_text_column(rows, config.reference_column, "data.reference_column", config.dataset)
    rows = rows.filter(lambda text: config.min_chars < len(text) <= config.max_chars, input_columns=config.text_column)
    if len(rows) < 2:
        raise DetoxError(
            f"only {len(rows)} rows are left after keeping texts with {config.min_chars} < length <= "
            f"{config.max_chars} characters; change data.min_chars/max_chars or the dataset"
        )
    template = config.prompt_template
    rows = rows.map(lambda text: {"prompt": template.replace("{text}", text)}, input_columns=config.text_column)
    split = rows.train_test_split(test_size=config.test_size, shuffle=True, seed=config.split_seed)
    return split["train"], split["test"]
