"""Command line: ``detoxrl train | evaluate | compare``.

Every setting of :class:`detoxrl.config.Config` is a flag (``--rl.learning_rate 1e-4``);
the common ones also have their Hugging Face spelling (``--model_name_or_path``,
``--output_dir``, ``--seed``, ``--report_to``). Errors the user can fix print one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from .config import PRESETS, build_config, iter_fields
from .errors import DetoxError

ALIASES = {"model_name_or_path": "model.name_or_path", "steps": "rl.steps", "learning_rate": "rl.learning_rate"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, _, help_text in iter_fields():
        section = name.split(".")[0] if "." in name else "run"
        group = groups.setdefault(section, parser.add_argument_group(f"{section} settings"))
        flags = [f"--{name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == name]
        group.add_argument(*flags, dest=f"cfg:{name}", default=None, metavar="VALUE", help=help_text)


def collect_overrides(args: argparse.Namespace) -> dict[str, str]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other detoxrl error (subcommands inherit it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"detoxrl: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="detoxrl", description="Detoxify language models with PPO + LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA adapter with PPO, then evaluate it")
    train.add_argument("--preset", choices=PRESETS, default=None,
                       help="start from a preset (default: smollm2-offline when no --config is given)")
    train.add_argument("--config", default=None, help="YAML file of settings (applied after the preset)")
    train.add_argument("--resume", action="store_true", help="continue from the output directory's last checkpoint")
    add_config_flags(train)

    evaluate = sub.add_parser("evaluate", help="compare a trained run with its reference model")
    evaluate.add_argument("run_dir", help="directory of a detoxrl run (holds config.yaml and adapter/)")
    evaluate.add_argument("--dataset", default=None, help="evaluate on all rows of this file instead of the test split")
    evaluate.add_argument("--samples_per_prompt", type=int, default=None, help="responses per prompt and model")
    evaluate.add_argument("--evaluators", default=None, help="comma-separated held-out scorers")
    evaluate.add_argument("--max_prompts", type=int, default=None, help="evaluate at most this many prompts")
    evaluate.add_argument("--threshold", type=float, default=None, help="toxicity above which a text is toxic")
    evaluate.add_argument("--output_dir", default=None, help="where to write the report (default: RUN_DIR/eval)")

    compare = sub.add_parser("compare", help="print two runs' metrics side by side")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
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
    for name in ("datasets", "accelerate", "huggingface_hub", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # datasets logs a parse error before raising it; detoxrl reports it once, on its own line.
    datasets.utils.logging.set_verbosity(logging.CRITICAL)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    if args.command == "train":
        from .train import train

        overrides = collect_overrides(args)
        config_file, preset = args.config, args.preset or (None if args.config else "smollm2-offline")
        saved = Path(overrides.get("output_dir") or "") / "config.yaml"
        if args.resume and not args.config and not args.preset and "output_dir" in overrides and saved.is_file():
            config_file, preset = saved, None  # resume with the run's own settings
        config = build_config(preset, config_file, overrides)
        out = train(config, resume=args.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: adapter, metrics and report are in {out}")
    elif args.command == "evaluate":
        from .evaluation.evaluate import evaluate_run

        out = evaluate_run(
            args.run_dir,
            dataset=args.dataset,
            samples_per_prompt=args.samples_per_prompt,
            evaluators=args.evaluators.split(",") if args.evaluators else None,
            max_prompts=args.max_prompts,
            threshold=args.threshold,
            output_dir=args.output_dir,
        )
        print(f"report: {Path(out) / 'report.html'}")
    elif args.command == "compare":
        from rich.console import Console

        from .evaluation.compare import compare_runs

        Console().print(compare_runs(args.run_a, args.run_b))
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
