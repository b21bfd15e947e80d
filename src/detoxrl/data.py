"""Prompts: a hub dataset or a local file (nested records as dotted columns), filtered by a numeric column
and by length, templated, split train/test."""

from __future__ import annotations

import codecs
from importlib import resources
from pathlib import Path

from datasets import Dataset, load_dataset

from .config import COMPARISONS, DataConfig, parse_row_filter
from .errors import DetoxError
from .hub import OFFLINE_HINT

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def sample_dataset_path(name: str = "heated_dialogsum") -> Path:
    """A dataset shipped with detoxrl (``detoxrl:NAME``; no network needed): by default the DialogSum-format
    sample set."""
    return Path(str(resources.files("detoxrl.assets").joinpath(f"{name}.jsonl")))


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
    """The dataset's rows, nested records flattened into dotted columns (``prompt.text``: key ``text`` of
    column ``prompt``), as datasets' ``Dataset.flatten`` names them."""
    return read_rows(config).flatten()


def read_rows(config: DataConfig) -> Dataset:
    name = config.dataset
    if name.startswith("detoxrl:"):  # a dataset shipped with detoxrl
        name = str(sample_dataset_path(name.split(":", 1)[1]))
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


def require_column(rows: Dataset, column: str, setting: str) -> None:
    """Refuse a column the rows lack, naming what is there: the keys of a nested record when ``column`` names
    one of its keys (``prompt.txt``: the keys of ``prompt``), else every column."""
    if column in rows.column_names:
        return
    record, _, key = column.rpartition(".")
    keys = [name[len(record) + 1 :] for name in rows.column_names if record and name.startswith(f"{record}.")]
    if keys:
        raise DetoxError(f"dataset has no key {key!r} in {record!r} ({setting} {column!r}); its keys are: "
                         f"{', '.join(keys)}")
    raise DetoxError(f"dataset has no column {column!r} ({setting}); its columns are: {', '.join(rows.column_names)}")


def filter_rows(rows: Dataset, spec: str, dataset: str) -> Dataset:
    """The rows where ``spec`` (data.filter, :func:`~detoxrl.config.parse_row_filter`) holds; a row without a
    value in its column is dropped, as TRL's RealToxicityPrompts example drops prompts without a toxicity."""
    column, op, value = parse_row_filter(spec)
    require_column(rows, column, "data.filter")
    kind = getattr(rows.features[column], "dtype", "a nested record")
    if not (kind == "bool" or kind.startswith(("int", "uint", "float"))):
        raise DetoxError(f"data.filter {spec!r}: column {column!r} of dataset {dataset} holds {kind} values, not "
                         "numbers")
    compare = COMPARISONS[op]
    kept = rows.filter(lambda x: x is not None and compare(x, value), input_columns=column)
    if len(kept) == 0:
        raise DetoxError(f"data.filter {spec!r} keeps none of the {len(rows)} rows of dataset {dataset}; loosen it")
    return kept


def build_splits(config: DataConfig, exclude: tuple[str, set] | None = None) -> tuple[Dataset, Dataset]:
    """Keep the rows ``data.filter`` selects, filter by length (min_chars < len <= max_chars), add ``prompt``,
    split with ``split_seed``.

    ``exclude`` is (column, values): rows holding one of the values there are left out (a protocol's test
    prompts, when they come from the same dataset).

    The split seed is not the run's seed, so runs with different training seeds share their test prompts.

    ``config`` is not changed: a ``reference_column`` the dataset lacks is simply absent from the rows, so
    callers check ``column in rows.column_names``.
    """
    rows = load_rows(config)
    require_column(rows, config.text_column, "data.text_column")
    check_text_column(rows, config.text_column, "data.text_column", config.dataset)
    if config.reference_column and config.reference_column in rows.column_names:
        check_text_column(rows, config.reference_column, "data.reference_column", config.dataset)
    if config.filter is not None:
        rows = filter_rows(rows, config.filter, config.dataset)
    if exclude and exclude[0] in rows.column_names:
        column, values = exclude
        rows = rows.filter(lambda value: str(value) not in values, input_columns=column)
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


def run_splits(config) -> tuple[Dataset, Dataset, Dataset]:
    """A run's training, validation and test prompts.

    With ``eval.protocol`` the test prompts are the protocol's (:func:`~detoxrl.evaluation.protocol.protocol_rows`,
    never trained on: their ids are dropped from ``data.dataset`` if it holds them), and the held-out split of
    ``data.dataset`` is validation. Without one, the held-out split is the test split, and validation is the
    first ``eval.curve_prompts`` training rows (of ``eval.toxicity_group``, when set) if learning curves are on,
    held out of training so that the curves never read the test split.
    """
    from .evaluation.protocol import load_protocol, protocol_rows

    spec = config.eval.protocol
    if spec:
        protocol = load_protocol(spec)
        test = protocol_rows(protocol, config.data.prompt_template)
        same = protocol.dataset == config.data.dataset
        train, validation = build_splits(config.data, (protocol.id_column, set(test[protocol.id_column])) if same else None)
        return train, validation, test
    train, test = build_splits(config.data)
    if not config.eval.curve_steps:
        return train, train.select([]), test
    e = config.eval
    candidates = range(len(train))
    if e.toxicity_group is not None and e.group_column in train.column_names:
        candidates = [i for i, g in enumerate(train[e.group_column]) if str(g) == e.toxicity_group]
    held = set(list(candidates)[: min(e.curve_prompts, len(train) - 1)])
    return train.select([i for i in range(len(train)) if i not in held]), train.select(sorted(held)), test
