"""``detoxrl generate RUN``: a finished run's responses to new prompts.

Prompts get the run's prompt template and chat template, and are sampled as in training (the
seeded sampler: one seed per prompt, so a response does not depend on the batch it is in), or
decoded greedily. ``--with_reference`` adds the reference model's response for the same seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from .config import Config
from .errors import DetoxError
from .policy import Policy
from .rundir import load_run



def read_prompts(config: Config, texts: list[str], file: str | None, stdin: Iterable[str] | None,
                 template: bool = True) -> list[str]:
    """Prompts from arguments, a file or stdin.

    Texts (arguments, .txt lines, stdin lines, the data text column of .jsonl rows) are put into
    the run's prompt template unless ``template`` is false; a .jsonl ``prompt`` field is a whole
    prompt already, as in the run's responses.jsonl.
    """
    fill = (lambda t: config.data.prompt_template.replace("{text}", t)) if template else (lambda t: t)
    if texts and file:
        raise DetoxError("give prompts as arguments or with --file, not both")
    if texts:
        prompts = [fill(t) for t in texts]
    elif file:
        prompts = _prompts_from_file(Path(file), config, fill)
    elif stdin is not None:
        prompts = [fill(line.rstrip("\n")) for line in stdin if line.strip()]
    else:
        raise DetoxError("no prompts: give them as arguments, with --file, or on stdin")
    if not prompts:
        raise DetoxError(f"no prompts in {file or 'stdin'}")
    return prompts


def _prompts_from_file(path: Path, config: Config, fill) -> list[str]:
    if not path.is_file():
        raise DetoxError(f"prompt file not found: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise DetoxError(f"prompt file {path} must be .txt (one text per line) or .jsonl (a 'prompt' or "
                         f"{config.data.text_column!r} field per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DetoxError(f"prompt file {path} is not UTF-8 text") from None
    if path.suffix == ".txt":
        return [fill(line) for line in lines if line.strip()]
    prompts = []
    column = config.data.text_column
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DetoxError(f"{path} line {number} is not JSON: {exc.msg}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get(column), str):
            prompts.append(fill(row[column]))
        else:
            raise DetoxError(f"{path} line {number} has no 'prompt' or {column!r} text field")
    return prompts


def generate_responses(policy: Policy, config: Config, prompts: list[str], use_greedy: bool = False,
                       with_reference: bool = False, batch_size: int | None = None) -> list[dict[str, str]]:
    """One response per prompt (and the reference model's, for the same seed); in batches."""
    from .sampling import GENERATE_STREAM, eval_mode, greedy, inference_weights, sample, texts_of

    def respond(model) -> list[str]:
        if use_greedy:
            return greedy(policy, model, prompts, config, batch_size)
        return texts_of(sample(policy, model, prompts, config, 1, GENERATE_STREAM, batch_size=batch_size))

    rows = [{"prompt": p} for p in prompts]
    with eval_mode(policy.module):
        if with_reference:
            with policy.reference_model() as reference:
                for row, text in zip(rows, respond(reference)):
                    row["reference_response"] = text
        with inference_weights(policy) as model:  # LoRA folded in, as in a merged export
            for row, text in zip(rows, respond(model)):
                row["response"] = text
    return rows


def format_rows(rows: list[dict[str, str]], as_jsonl: bool) -> str:
    """One JSON object per line, or plain text; several prompts' responses each under a ``==> N <==`` line,
    since a response can hold blank lines itself."""
    if as_jsonl:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    blocks = []
    for number, row in enumerate(rows, 1):
        if "reference_response" in row:
            block = f"adapter: {row['response']}\nreference: {row['reference_response']}"
        else:
            block = row["response"]
        blocks.append(f"==> {number} <==\n{block}" if len(rows) > 1 else block)
    return "\n".join(blocks) + "\n"


def generate_run(run_dir: str | Path, texts: list[str], file: str | None = None, stdin: Iterable[str] | None = None,
                 template: bool = True, temperature: float | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None, use_greedy: bool = False, with_reference: bool = False,
                 batch_size: int | None = None) -> list[dict[str, str]]:
    """``detoxrl generate``: the run's settings, with the sampling flags applied on top."""
    run = load_run(run_dir)
    config = run.config
    if temperature is not None:
        if not temperature > 0:
            raise DetoxError(f"--temperature must be positive, got {temperature}; use --greedy for the most "
                             "likely tokens")
        config.generation.temperature = temperature
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise DetoxError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
        config.generation.max_new_tokens = max_new_tokens
        config.generation.min_new_tokens = min(config.generation.min_new_tokens, max_new_tokens)
    if seed is not None:
        config.seed = seed
    if batch_size is not None and batch_size < 1:
        raise DetoxError(f"--batch_size must be at least 1, got {batch_size}")
    prompts = read_prompts(config, texts, file, stdin, template)
    policy = run.load_policy()
    return generate_responses(policy, config, prompts, use_greedy, with_reference, batch_size)


def stdin_lines() -> Iterable[str] | None:
    """Standard input's lines when something is piped in; None at an interactive terminal."""
    return None if sys.stdin is None or sys.stdin.isatty() else sys.stdin
