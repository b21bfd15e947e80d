"""Command line: ``detoxrl train | sft | evaluate | compare | generate | export``.

Every setting of :class:`detoxrl.config.Config` is a flag (``--rl.learning_rate 1e-4``) whose help
shows its type, default and choices; a bare boolean flag means true, and lists take spaces or
commas. The common ones also have their Hugging Face spelling (``--model_name_or_path``,
``--output_dir``, ``--seed``, ``--report_to``). Errors the user can fix print one line.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import types
import typing
import warnings

from .config import (
    LOSS_NORMALIZATIONS, MIXED_PRECISIONS, MODEL_DTYPES, PRESETS, SCORERS, TRANSFORMS, Config, build_config,
    iter_fields, load_run_config,
)
from .errors import DetoxError
from .rl.algorithms import ALGORITHMS
from .rundir import RunDir

DEFAULT_PRESET = "smollm2-offline"
ALIASES = {"model_name_or_path": "model.name_or_path", "steps": "rl.steps", "learning_rate": "rl.learning_rate"}
SFT_ALIASES = {"model_name_or_path": "model.name_or_path", "learning_rate": "sft.learning_rate",
               "max_steps": "sft.max_steps"}
# Settings with a fixed set of values (Config.validate refuses the others).
CHOICES = {
    "reward.scorer": SCORERS,
    "reward.transform": TRANSFORMS,
    "rl.algorithm": ALGORITHMS,  # the registry itself, so that algorithms registered later are offered too
    "rl.loss_normalization": LOSS_NORMALIZATIONS,
    "mixed_precision": MIXED_PRECISIONS,
    "model.dtype": MODEL_DTYPES,
}
CONFIG_HELP = (
    "YAML file of settings, applied over the preset. Given alone it applies over the built-in defaults, "
    f"not over the {DEFAULT_PRESET} preset: add --preset {DEFAULT_PRESET} to keep that preset's settings"
)
LAYERS = (
    "Settings are layered: built-in defaults, then --preset (default: smollm2-offline, unless --config is "
    "given), then --config FILE, then flags. Example: --preset smollm2-offline --config small.yaml {example}."
)

# evaluate RUN takes the evaluation's and the sampling's settings (every other section is the run's own);
# evaluate --model also the model's, the data's, the reward's, the seed, the device and the threads.
EVALUATE_SKIP = ("rl", "sft", "output_dir", "report_to", "mixed_precision", "save_steps", "save_total_limit")
EVALUATE_ALIASES = {"samples_per_prompt": "eval.samples_per_prompt", "evaluators": "eval.evaluators",
                    "max_prompts": "eval.max_prompts", "threshold": "eval.threshold",
                    "model": "model.name_or_path", "adapter": "model.adapter"}

SETTINGS_USAGE = "detoxrl {command} [--preset NAME] [--config FILE] [--print_config] [--SECTION.SETTING VALUE ...]"


def not_none(annotation: typing.Any) -> typing.Any:
    """``int`` for ``int | None``: the type a value has when it is set."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def type_name(annotation: typing.Any) -> str:
    annotation = not_none(annotation)
    if typing.get_origin(annotation) is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    return annotation.__name__


def show(value: typing.Any, limit: int = 60) -> str:
    """A default as the user would type it, shortened."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    text = json.dumps(value) if isinstance(value, str) and (not value or "\n" in value or " " in value) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_config_flags(parser: argparse.ArgumentParser, aliases: dict[str, str], skip: tuple[str, ...],
                     run_defaults: bool = False) -> None:
    """One flag per setting, except the ``skip`` sections and settings that the command does not use.

    ``run_defaults``: the command starts from a saved run's settings, so the help says so instead of
    showing the built-in default and the preset's.
    """
    defaults, offline = Config(), build_config(DEFAULT_PRESET)
    value = lambda config, name: functools.reduce(getattr, name.split("."), config)  # noqa: E731
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, annotation, help_text in iter_fields():
        section = name.split(".")[0] if "." in name else "run"
        if section in skip or name in skip:
            continue
        group = groups.setdefault(section, parser.add_argument_group(f"{section} settings"))
        flags = [f"--{name}"] + [f"--{alias}" for alias, target in aliases.items() if target == name]
        kind = not_none(annotation)
        if kind is bool:  # bare flag = true; "--flag false" still works
            options = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif typing.get_origin(kind) is list:
            options = {"nargs": "+", "metavar": type_name(typing.get_args(kind)[0]).upper()}
        else:
            options = {"metavar": type_name(annotation).upper()}
        default, preset = value(defaults, name), value(offline, name)
        details = f"{type_name(annotation)}; default: {show(default)}"
        if run_defaults:
            details = f"{type_name(annotation)}; default: the run's, with --model the preset's"
        elif preset != default:
            details += f", {DEFAULT_PRESET}: {show(preset)}"
        if name in CHOICES:
            details += f"; choices: {', '.join(CHOICES[name])}"
        group.add_argument(*flags, dest=f"cfg:{name}", default=None, help=f"{help_text} [{details}]".replace("%", "%%"),
                           **options)


def split_list(values: list[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: lists take spaces, commas or both."""
    return [item for value in values for item in value.split(",") if item]


def collect_overrides(args: argparse.Namespace) -> dict[str, typing.Any]:
    return {
        k[4:]: split_list(v) if isinstance(v, list) else v
        for k, v in vars(args).items()
        if k.startswith("cfg:") and v is not None
    }


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other detoxrl error (subcommands inherit it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"detoxrl: error: {message} (see {self.prog} --help)\n")


def add_layer_flags(parser: argparse.ArgumentParser, aliases: dict[str, str], skip: tuple[str, ...]) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help=f"start from a preset (default: {DEFAULT_PRESET} when no --config is given)")
    parser.add_argument("--config", default=None, metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--print_config", action="store_true", help="print the resolved settings as YAML and exit")
    add_config_flags(parser, aliases, skip)


class SubParsers(argparse._SubParsersAction):
    """Subcommands that, like the main parser, take only whole flag names (``--rl.step`` is not ``--rl.steps``)."""

    def add_parser(self, name, **kwargs):
        return super().add_parser(name, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="detoxrl", allow_abbrev=False,
                    description="Detoxify language models with reinforcement learning on a LoRA adapter.")
    parser.add_argument("--version", action="version", version=f"detoxrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, action=SubParsers)

    train = sub.add_parser("train", help="train a LoRA adapter with RL, then evaluate it",
                           epilog=LAYERS.format(example="--rl.steps 2"),
                           usage=SETTINGS_USAGE.format(command="train") + " [--resume [--resume_with_changes]]")
    add_layer_flags(train, ALIASES, skip=("sft",))
    train.add_argument("--resume", action="store_true", help="continue from the output directory's last checkpoint "
                       "(or, when training had finished, run only the missing evaluation); settings that decide the "
                       "result must stay as saved")
    train.add_argument("--resume_with_changes", action="store_true",
                       help="with --resume: continue even though settings that decide the result changed (the "
                       "changes are recorded in resumes.jsonl and metrics.json)")

    sft = sub.add_parser(
        "sft", epilog=LAYERS.format(example="--sft.max_steps 2"), usage=SETTINGS_USAGE.format(command="sft"),
        help="supervised LoRA fine-tuning on (prompt, data.reference_column) pairs; train continues from it",
        description="Fine-tune a LoRA adapter on the data's reference responses (loss on the target tokens only), "
        "with the same data, prompt and chat template as train. Continue with RL: "
        "detoxrl train --model.adapter OUTPUT_DIR/adapter.",
    )
    add_layer_flags(sft, SFT_ALIASES, skip=("rl", "reward"))

    evaluate = sub.add_parser(
        "evaluate", help="compare a trained run with its reference model, or judge any model",
        usage="detoxrl evaluate RUN_DIR [--dataset FILE] [--output_dir DIR] [--overwrite] [--eval.SETTING VALUE ...]\n"
        "       detoxrl evaluate --model ID_OR_PATH [--adapter PATH] --output_dir DIR [--preset NAME] [--config FILE] "
        "[--dataset FILE] [--SECTION.SETTING VALUE ...]",
        description="Sample the run's policy and its reference model on the run's test split (or --dataset) with the "
        "same seeds, judge both, and write metrics.json, report.html, samples.csv and responses.jsonl to "
        "RUN_DIR/eval (or --output_dir). Settings default to the run's own; flags change them for this evaluation. "
        "With --model instead of RUN_DIR, judge that model alone (its baseline before training), or with --adapter "
        "the base against base + adapter, under the preset's settings (--preset, --config and flags, as for train).",
    )
    evaluate.add_argument("run_dir", nargs="?", default=None,
                          help="directory of a detoxrl run (holds config.yaml and adapter/); leave out with --model")
    evaluate.add_argument("--preset", choices=PRESETS, default=None,
                          help=f"with --model: start from a preset (default: {DEFAULT_PRESET} when no --config is "
                          "given)")
    evaluate.add_argument("--config", default=None, metavar="FILE", help=f"with --model: {CONFIG_HELP}")
    evaluate.add_argument("--dataset", default=None, metavar="FILE",
                          help="evaluate on all rows of this file (.csv, .json, .jsonl, .parquet) instead of the run's "
                          "test split [default: the test split]")
    evaluate.add_argument("--output_dir", default=None, metavar="DIR",
                          help="where to write [default: RUN_DIR/eval; with --model: required]")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an evaluation already in the output directory (otherwise it is refused)")
    add_config_flags(evaluate, EVALUATE_ALIASES, skip=EVALUATE_SKIP, run_defaults=True)

    compare = sub.add_parser(
        "compare", help="print two runs' metrics side by side",
        description="Training and evaluation metrics of two runs side by side, with the change from A to B. Each "
        "run's evaluation is the newer of RUN/metrics.json (end of training) and RUN/eval/metrics.json (detoxrl "
        "evaluate); two evaluations of different data or protocols are refused.",
    )
    compare.add_argument("run_a", help="run A: a detoxrl run directory, or a directory detoxrl evaluate wrote")
    compare.add_argument("run_b", help="run B, the same kinds as run A")

    generate = sub.add_parser(
        "generate", help="responses of a finished run to new prompts",
        description="Respond to texts given as arguments, in a file or on stdin, with the run's prompt template, "
        "chat template and sampling settings. Each prompt has its own seed, so responses do not depend on batching.",
    )
    generate.add_argument("run_dir", help="a finished detoxrl run (train or sft)")
    generate.add_argument("texts", nargs="*", metavar="TEXT", help="texts to put into the run's prompt template")
    generate.add_argument("--file", default=None,
                          help="a .txt file (one text per line) or .jsonl file (a 'prompt' field, used as it is, or "
                          "the data's text column)")
    generate.add_argument("--no_template", action="store_true", help="send the texts as they are, without the prompt template")
    generate.add_argument("--temperature", type=float, default=None, help="sampling temperature [default: the run's]")
    generate.add_argument("--max_new_tokens", type=int, default=None, help="longest response [default: the run's]")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed [default: the run's]")
    generate.add_argument("--greedy", action="store_true", help="the most likely tokens instead of sampling")
    generate.add_argument("--with_reference", action="store_true",
                          help="also the reference model's response (adapter off), with the same seed")
    generate.add_argument("--batch_size", type=int, default=None, help="prompts per batch [default: eval.batch_size]")
    generate.add_argument("--jsonl", action="store_true", help="one JSON object per prompt instead of plain text")

    export = sub.add_parser(
        "export", help="write a run's adapter, or the merged model, for use without detoxrl",
        description="Copy a finished run's LoRA adapter as a PEFT directory, or with --merge save base + adapter as "
        "one transformers model (safetensors, tokenizer, chat template); both with a model card.",
    )
    export.add_argument("run_dir", help="a finished detoxrl run (train or sft)")
    export.add_argument("out", help="new or empty directory to write")
    export.add_argument("--merge", action="store_true", help="merge the adapter into the base model (merge_and_unload)")
    export.add_argument("--push_to_hub", default=None, metavar="REPO",
                        help="then upload to this model hub repository (needs `hf auth login` or HF_TOKEN)")
    export.add_argument("--private", action="store_true", help="create the hub repository as private")
    return parser


def quiet_libraries() -> None:
    """Keep the console for detoxrl's own progress: library chatter goes below warnings."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("datasets", "accelerate", "huggingface_hub", "httpx", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # datasets logs a parse error before raising it; detoxrl reports it once, on its own line.
    datasets.utils.logging.set_verbosity(logging.CRITICAL)


def layered_config(args: argparse.Namespace) -> Config:
    """Defaults, preset, --config file, flags; resuming without --config reuses the run's own settings."""
    overrides = collect_overrides(args)
    saved = RunDir(overrides.get("output_dir") or "").config
    if getattr(args, "resume", False) and not args.config and not args.preset and "output_dir" in overrides \
            and saved.is_file():
        return load_run_config(saved, overrides)
    return build_config(args.preset or (None if args.config else DEFAULT_PRESET), args.config, overrides)


def print_headline(metrics_file) -> None:
    """The evaluation's verdict, as the last thing a long command prints before the path of its report."""
    from rich.console import Console

    from .evaluation.compare import headline_table, read_metrics

    Console().print(headline_table(read_metrics(metrics_file)))


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "generate" and not any(e.startswith("-") for e in extra):
        args.texts += extra  # texts after the options: argparse leaves them over
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(layered_config(args).to_dict(), sort_keys=False), end="")
        return 0
    quiet_libraries()
    if args.command == "train":
        from .train import train

        if args.resume_with_changes and not args.resume:
            raise DetoxError("--resume_with_changes needs --resume")
        out = train(layered_config(args), resume=args.resume, resume_with_changes=args.resume_with_changes)
        if int(os.environ.get("RANK", "0")) == 0:
            evaluated = RunDir(out).report.is_file()
            if evaluated:
                print_headline(RunDir(out).metrics)
            written = "adapter, metrics and report" if evaluated else \
                "adapter and metrics (no evaluation: eval.enabled is false)"
            print(f"done: {written} are in {out}")
    elif args.command == "sft":
        from .sft import sft

        out = sft(layered_config(args))
        print(f"done: adapter and metrics are in {out}; continue with: detoxrl train --model.adapter {out / 'adapter'}")
    elif args.command == "evaluate":
        from .evaluation.command import evaluate_model, evaluate_run

        overrides = collect_overrides(args)
        if args.run_dir is None:
            if "model.name_or_path" not in overrides:
                raise DetoxError("evaluate needs a run directory, or --model ID_OR_PATH to judge a model without a run")
            if not args.output_dir:
                raise DetoxError("evaluate --model needs --output_dir DIR: there is no run directory to write into")
            out = evaluate_model(layered_config(args), args.output_dir, dataset=args.dataset, overwrite=args.overwrite)
        else:
            if "model.name_or_path" in overrides:
                raise DetoxError(f"--model judges a model without a run, so it cannot go with the run directory "
                                 f"{args.run_dir}; give one of them")
            if args.preset or args.config:
                raise DetoxError("a run is evaluated with its own settings (RUN_DIR/config.yaml); --preset and "
                                 "--config go with --model")
            out = evaluate_run(args.run_dir, dataset=args.dataset, output_dir=args.output_dir,
                               overwrite=args.overwrite, overrides=overrides)
        print_headline(RunDir(out).metrics)
        print(f"report: {RunDir(out).report}")
    elif args.command == "compare":
        from rich.console import Console

        from .evaluation.compare import compare_runs

        Console().print(compare_runs(args.run_a, args.run_b))
    elif args.command == "generate":
        from .generate import format_rows, generate_run, stdin_lines

        rows = generate_run(
            args.run_dir, args.texts, args.file, None if args.texts or args.file else stdin_lines(),
            template=not args.no_template, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            seed=args.seed, use_greedy=args.greedy, with_reference=args.with_reference, batch_size=args.batch_size,
        )
        sys.stdout.write(format_rows(rows, args.jsonl))
    elif args.command == "export":
        from .export import export_run

        out = export_run(args.run_dir, args.out, merge=args.merge, hub_repo=args.push_to_hub, private=args.private)
        print(f"exported {'merged model' if args.merge else 'adapter'} to {out}"
              + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def report(message: str) -> None:
    """Print ``message`` as one line on stderr, below any progress bar that is still open."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # ends the bar's line, so the message starts on a line of its own
    except Exception:  # a progress bar must never hide the error
        pass
    print(" ".join(message.split()) if "\n" in message else message, file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, as sent by schedulers, ``timeout`` and ``kill``: handled like Ctrl-C, with exit code 143."""


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
        handling_sigterm = True
    except ValueError:  # not the main thread, where only the main thread may handle signals
        handling_sigterm = False
    try:
        code = run(argv)
    except DetoxError as exc:
        report(f"detoxrl: error: {exc}")
        code = 2
    except KeyboardInterrupt as exc:
        report("detoxrl: interrupted; continue with --resume (checkpoints are kept)")
        code = 143 if isinstance(exc, Terminated) else 130
    except MemoryError:
        report("detoxrl: error: out of memory; lower rl.batch_size or generation.max_new_tokens")
        code = 1
    except OSError as exc:
        if os.environ.get("DETOXRL_DEBUG"):
            raise
        report(f"detoxrl: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        code = 1
    except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("DETOXRL_DEBUG"):
            raise
        report(f"detoxrl: error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
               "(set DETOXRL_DEBUG=1 for the traceback)")
        code = 1
    finally:
        if handling_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    sys.exit(code)


if __name__ == "__main__":
    main()
