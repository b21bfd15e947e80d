#!/usr/bin/env python3
"""Time one PPO iteration of detoxrl and of TRL baselines on identical settings.

Each side runs in a virtual environment of its own (created here under benchmarks/.venvs/
on first use), as a fresh subprocess per measurement. Repeats are interleaved
(A B C A B C ...), so slow drift of the machine hits every side alike. Each subprocess
loads the random model of the setting (same layout and seed for every side) from disk,
runs warm-up iteration(s) that are not timed, then times the iteration(s) and prints one
JSON line. This script reports the medians over the
repeats and the ratio of each side to detoxrl, and writes everything to a JSON file.

    python benchmarks/run.py                       # everything, full size, 3 repeats
    python benchmarks/run.py --quick               # tiny sizes: a smoke run
    python benchmarks/run.py --quick --sides detoxrl
    python benchmarks/run.py --setting seq2seq --sides detoxrl,trl-ppo-batched --repeats 5

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES_DIR = HERE / "sides"
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"

sys.path.insert(0, str(SIDES_DIR))
import _common as common  # noqa: E402  (stdlib-only at import time)

TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; anything else pulls a CUDA build

# Environments. Each entry is the pip arguments that install it.
ENVIRONMENTS = {
    # TRL 0.11.4: the last release with the classic PPOTrainer and the value-head models.
    "trl-0.11": [
        "trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "datasets<3", "rich", TORCH,
    ],
    # The current TRL; RLOO with LoRA needs peft (pinned to the version detoxrl is tested with).
    "trl-1.16": ["trl==1.16.0", "peft==0.21.2", TORCH],
    # detoxrl itself, editable, with the project's pinned constraints.
    "detoxrl": None,  # built by detoxrl_install_args()
}


def detoxrl_install_args() -> list[str]:
    constraints = ROOT / "constraints.txt"
    args = ["-c", str(constraints)] if constraints.is_file() else []
    return args + [TORCH, "-e", str(ROOT)]


def environment_args(name: str) -> list[str]:
    return detoxrl_install_args() if name == "detoxrl" else list(ENVIRONMENTS[name])


def environment_stamp(name: str) -> str:
    """Changes when what the environment should hold changes (then it is re-installed)."""
    h = hashlib.sha256(json.dumps(environment_args(name)).encode())
    if name == "detoxrl":
        for f in ("pyproject.toml", "constraints.txt"):
            p = ROOT / f
            h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


@dataclass
class Side:
    name: str
    environment: str
    script: str
    args: list[str]
    settings: tuple[str, ...]  # settings it can run
    default_settings: tuple[str, ...]  # settings it runs when --sides is not given
    description: str


SIDES = {
    s.name: s
    for s in [
        Side("detoxrl", "detoxrl", "detoxrl_side.py", [], ("seq2seq", "causal"), ("seq2seq", "causal"),
             "detoxrl load_policy + RLTrainer.step(prompts)"),
        Side("trl-ppo-loop", "trl-0.11", "trl_ppo.py", ["--generation", "loop"], ("seq2seq", "causal"),
             ("seq2seq",), "TRL 0.11.4 PPOTrainer, one generate() per prompt (the recipe's loop), then step()"),
        Side("trl-ppo-batched", "trl-0.11", "trl_ppo.py", ["--generation", "batched"], ("seq2seq", "causal"),
             ("seq2seq", "causal"), "TRL 0.11.4 PPOTrainer, generate(list, batch_size=B), then step()"),
        Side("trl-rloo", "trl-1.16", "trl_rloo.py", [], ("causal",), ("causal",),
             "TRL 1.16 RLOOTrainer.train(), B/2 prompts x 2 completions per round"),
        Side("detoxrl-bf16", "detoxrl", "detoxrl_side.py", ["--dtype", "bfloat16"], ("seq2seq", "causal"),
             ("seq2seq", "causal"), "detoxrl with model.dtype bfloat16 (base weights; LoRA, log-probs, losses fp32)"),
        Side("trl-ppo-batched-bf16", "trl-0.11", "trl_ppo.py", ["--generation", "batched", "--dtype", "bfloat16"],
             ("seq2seq", "causal"), ("seq2seq",), "TRL 0.11.4 PPOTrainer batched, model loaded in bfloat16"),
        Side("detoxrl-rloo", "detoxrl", "detoxrl_side.py", ["--algorithm", "rloo"], ("seq2seq", "causal"),
             ("causal",), "detoxrl RLOO: B/2 prompts x 2 responses, no value head (compare with trl-rloo)"),
        Side("detoxrl-recompute", "detoxrl", "detoxrl_side.py", ["--recompute-prompts"], ("seq2seq", "causal"), (),
             "detoxrl with model.recompute_prompts (the update replays the prompts' layers: less memory, slower)"),
        Side("detoxrl-bf16-recompute", "detoxrl", "detoxrl_side.py", ["--dtype", "bfloat16", "--recompute-prompts"],
             ("seq2seq", "causal"), (), "detoxrl with a bf16 base and model.recompute_prompts"),
    ]
}
REFERENCE_SIDE = "detoxrl"
BUSY_SHARE = 0.05  # other processes above this share of the CPUs distort the timings
PHASES = ["generation_s", "reward_s", "reference_s", "optimisation_s", "total_s"]


@dataclass
class Run:
    repeat: int
    setting: str
    side: str
    rc: int | None = None
    wall_s: float | None = None
    loadavg_before: list[float] = field(default_factory=list)
    # CPU time that other processes used while this run ran, as a share of the machine
    # (all cores x wall time): a measure of how much the numbers are distorted.
    foreign_cpu_share: float | None = None
    result: dict | None = None
    error: str | None = None


# --------------------------------------------------------------------------- environments
def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_environment(name: str, base_python: str, install: bool) -> Path:
    path = VENVS / name
    python = venv_python(name)
    stamp_file = path / ".bench-stamp"
    stamp = environment_stamp(name)
    if python.exists() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return python
    if not install:
        raise SystemExit(f"environment {name} is missing or out of date at {path}; run without --no-install")
    VENVS.mkdir(parents=True, exist_ok=True)
    log = VENVS / f"{name}.install.log"
    if not python.exists():
        print(f"creating environment {name} ({path}) ...", flush=True)
        subprocess.run([base_python, "-m", "venv", str(path)], check=True)
    print(f"installing into {name}: pip install {' '.join(environment_args(name))} (log: {log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *environment_args(name)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT),
        )
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"installing environment {name} failed (exit {rc}); end of {log}:\n{tail}")
    stamp_file.write_text(stamp + "\n")
    print(f"  {name} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return python


def source_state() -> dict[str, str | bool | None]:
    """The commit of the working tree the detoxrl side runs (editable install) and whether src/ differs."""
    def git(*a: str) -> str | None:
        try:
            out = subprocess.run(["git", *a], capture_output=True, text=True, cwd=str(ROOT), timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src", "pyproject.toml", "constraints.txt")
    return {"commit": git("rev-parse", "HEAD"), "src_modified": bool(status) if status is not None else None}


def environment_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for p in ['torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'numpy', 'detoxrl']:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError):
        return {}


# --------------------------------------------------------------------------- models
def model_dir(environment: str, setting_name: str, quick: bool) -> Path:
    s = common.setting(setting_name, quick)
    key = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:10]
    return VENVS / "_models" / environment / f"{setting_name}-{'quick' if quick else 'full'}-{key}"


def ensure_model(python: Path, environment: str, setting_name: str, quick: bool, env: dict) -> Path:
    """Build and save the random model with this environment's transformers, once."""
    out = model_dir(environment, setting_name, quick)
    if (out / "config.json").is_file():
        return out
    print(f"preparing the {setting_name} model for {environment} ...", flush=True)
    cmd = [str(python), str(SIDES_DIR / "_common.py"), "prepare", "--setting", setting_name, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(SIDES_DIR))
    if proc.returncode != 0:
        raise SystemExit(f"preparing the {setting_name} model in {environment} failed:\n{proc.stderr[-3000:]}")
    return out


# --------------------------------------------------------------------------- running
def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_share(sample_s: float = 2.0) -> float | None:
    """Share of all CPUs busy over the next ``sample_s`` seconds (this process is idle meanwhile)."""
    b0 = busy_cpu_seconds()
    time.sleep(sample_s)
    b1 = busy_cpu_seconds()
    if b0 is None or b1 is None:
        return None
    return (b1 - b0) / (sample_s * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float, threshold: float = BUSY_SHARE) -> None:
    """Wait (at most ``max_wait_s``) until other processes leave the CPUs nearly idle."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    share = busy_share()
    if share is None or share <= threshold:
        return
    print(f"  waiting for the machine to go idle (CPUs {share:.0%} busy) ...", flush=True)
    while share is not None and share > threshold and time.monotonic() < deadline:
        share = busy_share(5.0)
    if share is not None and share > threshold:
        print(f"  still {share:.0%} busy after {max_wait_s:.0f} s; running anyway", flush=True)


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def side_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(VENVS / "_hf-home"),
        DETOXRL_CACHE=str(VENVS / "_detoxrl-cache"),
        WANDB_DISABLED="true",
        PYTHONHASHSEED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"side"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_side(run: Run, python: Path, model: Path, args, env: dict) -> Run:
    side = SIDES[run.side]
    cmd = [
        str(python), str(SIDES_DIR / side.script), *side.args,
        "--setting", run.setting, "--model-dir", str(model), "--warmup", str(args.warmup),
        "--iterations", str(args.iterations), "--threads", str(args.threads), "--side-name", side.name,
    ]
    if args.quick:
        cmd.append("--quick")
    run.loadavg_before = [round(x, 2) for x in os.getloadavg()]
    busy0, own0 = busy_cpu_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(SIDES_DIR), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        run.wall_s = time.perf_counter() - t
        run.error = f"timed out after {args.timeout} s"
        return run
    wall = time.perf_counter() - t
    run.wall_s = round(wall, 2)
    busy1, own1 = busy_cpu_seconds(), children_cpu_seconds()
    if busy0 is not None and busy1 is not None and wall > 0:
        foreign = (busy1 - busy0) - (own1 - own0)
        run.foreign_cpu_share = round(max(0.0, foreign) / (wall * (os.cpu_count() or 1)), 3)
    run.rc = proc.returncode
    run.result = parse_result(proc.stdout)
    if proc.returncode != 0 or run.result is None:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-30:]
        run.error = f"exit {proc.returncode}; " + ("\n".join(tail) if tail else "no output")
        run.result = None
    return run


# --------------------------------------------------------------------------- summary
def summarise(runs: list[Run]) -> dict:
    summary: dict[str, dict] = {}
    for r in runs:
        if r.result is None:
            continue
        rows = summary.setdefault(r.setting, {}).setdefault(r.side, {"results": [], "foreign": []})
        rows["results"].append(r.result)
        if r.foreign_cpu_share is not None:
            rows["foreign"].append(r.foreign_cpu_share)
    for setting_name, sides in summary.items():
        for side_name, rows in sides.items():
            results = rows.pop("results")
            foreign = rows.pop("foreign")
            rows["n"] = len(results)
            rows["foreign_cpu_share_max"] = max(foreign) if foreign else None
            for key in PHASES + ["peak_rss_mb", "samples_per_s"]:
                values = [x[key] for x in results if x.get(key) is not None]
                rows[key] = round(common.median(values), 4) if values else None
            totals = [x["total_s"] for x in results]
            rows["total_s_min"], rows["total_s_max"] = min(totals), max(totals)
        ref = sides.get(REFERENCE_SIDE)
        for side_name, rows in sides.items():
            if ref and ref.get("total_s") and rows.get("total_s"):
                # > 1: the side takes that many times as long per trained sample as detoxrl.
                rows["time_vs_detoxrl"] = round(rows["total_s"] / ref["total_s"], 3)
                rows["peak_rss_vs_detoxrl"] = round(rows["peak_rss_mb"] / ref["peak_rss_mb"], 3)
            else:
                rows["time_vs_detoxrl"] = rows["peak_rss_vs_detoxrl"] = None
    return summary


def fmt_share(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def fmt(value, width: int, digits: int = 2) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rjust(width)
    return str(value).rjust(width)


def print_table(summary: dict, quick: bool) -> None:
    header = (
        f"{'setting':<8} {'side':<16} {'n':>2} {'generate':>9} {'reward':>7} {'ref':>7} {'optimise':>9} "
        f"{'total s':>8} {'(min-max)':>15} {'samples/s':>9} {'peak MB':>8} {'x detoxrl':>9}"
    )
    print()
    print(f"medians per side ({'quick sizes' if quick else 'full sizes'}); times in seconds per PPO iteration")
    print(header)
    print("-" * len(header))
    for setting_name in ("seq2seq", "causal"):
        for side_name in SIDES:
            rows = summary.get(setting_name, {}).get(side_name)
            if not rows:
                continue
            spread = f"{rows['total_s_min']:.2f}-{rows['total_s_max']:.2f}"
            ratio = rows.get("time_vs_detoxrl")
            print(
                f"{setting_name:<8} {side_name:<16} {rows['n']:>2} {fmt(rows['generation_s'], 9)} "
                f"{fmt(rows['reward_s'], 7, 3)} {fmt(rows['reference_s'], 7)} {fmt(rows['optimisation_s'], 9)} "
                f"{fmt(rows['total_s'], 8)} {spread:>15} {fmt(rows['samples_per_s'], 9, 3)} "
                f"{fmt(rows['peak_rss_mb'], 8, 0)} {fmt(ratio, 9)}"
            )
    print()
    for setting_name in ("seq2seq", "causal"):
        for side_name, rows in summary.get(setting_name, {}).items():
            if side_name != REFERENCE_SIDE and rows.get("time_vs_detoxrl"):
                print(f"{setting_name}: detoxrl is {rows['time_vs_detoxrl']:.2f}x as fast as {side_name} "
                      f"(samples/s {summary[setting_name][REFERENCE_SIDE]['samples_per_s']:.3f} vs "
                      f"{rows['samples_per_s']:.3f}); peak RSS ratio {rows['peak_rss_vs_detoxrl']:.2f}")


# --------------------------------------------------------------------------- main
def summarise_files(paths: list[str]) -> int:
    runs, quick = [], set()
    for path in paths:
        document = json.loads(Path(path).read_text())
        quick.add(bool(document.get("options", {}).get("quick")))
        known = {f for f in Run.__dataclass_fields__}
        runs += [Run(**{k: v for k, v in r.items() if k in known}) for r in document.get("runs", [])]
    if len(quick) > 1:
        raise SystemExit("these files mix --quick and full-size runs")
    busy = [r for r in runs if (r.foreign_cpu_share or 0) > BUSY_SHARE]
    runs = [r for r in runs if r not in busy]
    print(f"{len(runs)} runs from {len(paths)} file(s); left out: {len(busy)} during which other processes "
          f"used more than {BUSY_SHARE:.0%} of the CPUs")
    print_table(summarise(runs), quick.pop() if quick else False)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run in seconds")
    parser.add_argument("--setting", choices=["seq2seq", "causal", "all"], default="all")
    parser.add_argument("--sides", default=None,
                        help=f"comma-separated sides (default: all): {', '.join(SIDES)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="subprocesses per side, interleaved (default: 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations in each subprocess (default 1)")
    parser.add_argument("--iterations", type=int, default=1,
                        help="timed iterations in each subprocess; their median is its result (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on every side (default 2)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before a subprocess is stopped")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each run, wait up to S seconds for other processes to leave the CPUs idle")
    parser.add_argument("--retry-busy", type=int, default=0, metavar="N",
                        help="measure a run again (up to N times) when other processes used more than "
                             f"{BUSY_SHARE:.0%}% of the CPUs during it")  # "5%%": argparse %-formats help strings
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/<timestamp>.json)")
    parser.add_argument("--python", default=sys.executable, help="interpreter the environments are made from")
    parser.add_argument("--no-install", action="store_true", help="fail instead of creating/updating environments")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=PYTHON",
                        help="use an existing interpreter for an environment instead of creating it, e.g. "
                             "--env detoxrl=.venv/bin/python (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the sides and exit")
    parser.add_argument("--summarise", nargs="+", metavar="JSON",
                        help="run nothing: print the medians over the runs stored in these result files")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1 or args.iterations < 1 or args.warmup < 0 or args.retry_busy < 0:
        parser.error("--repeats and --iterations must be >= 1, --warmup and --retry-busy >= 0")
    return args


def plan(args) -> list[tuple[str, str]]:
    """(setting, side) pairs in the order one repeat runs them."""
    settings = ["seq2seq", "causal"] if args.setting == "all" else [args.setting]
    if args.sides:
        names = [n.strip() for n in args.sides.split(",") if n.strip()]
        unknown = [n for n in names if n not in SIDES]
        if unknown:
            raise SystemExit(f"unknown side(s) {', '.join(unknown)}; sides: {', '.join(SIDES)}")
        pairs = [(st, n) for st in settings for n in names if st in SIDES[n].settings]
    else:
        pairs = [(st, n) for st in settings for n in SIDES if st in SIDES[n].default_settings]
    if not pairs:
        raise SystemExit("nothing to run: none of the chosen sides runs the chosen setting(s)")
    return pairs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for side in SIDES.values():
            print(f"{side.name:<16} env {side.environment:<9} settings {','.join(side.settings):<15} "
                  f"{side.description}")
        return 0
    if args.summarise:
        return summarise_files(args.summarise)
    pairs = plan(args)
    started = _dt.datetime.now(_dt.timezone.utc)
    source = source_state()
    out = Path(args.out) if args.out else RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
    if sys.version_info[:2] != (3, 11):
        print(f"warning: environments are made from Python {platform.python_version()}; "
              f"the local torch 2.13.0 CPU build is for Python 3.11", file=sys.stderr)

    env = side_env(args.threads)
    environments = sorted({SIDES[side].environment for _, side in pairs})
    given = {}
    for item in args.env:
        name, sep, python = item.partition("=")
        if not sep or name not in ENVIRONMENTS or not Path(python).exists():
            raise SystemExit(f"--env {item!r}: expected NAME=PYTHON with NAME in {', '.join(ENVIRONMENTS)} "
                             "and an existing interpreter")
        given[name] = Path(python).absolute()
    pythons = {name: given.get(name) or ensure_environment(name, args.python, not args.no_install)
               for name in environments}
    models = {
        (SIDES[side].environment, st): ensure_model(pythons[SIDES[side].environment], SIDES[side].environment, st,
                                                    args.quick, env)
        for st, side in pairs
    }

    runs: list[Run] = []
    total = args.repeats * len(pairs)
    print(f"{total} runs: {args.repeats} repeat(s) x [{', '.join(f'{st}/{sd}' for st, sd in pairs)}]", flush=True)
    discarded: list[Run] = []
    versions = {name: {"pip_install": environment_args(name) if name not in given else None,
                       "python": str(py), "versions": environment_versions(py)}
                for name, py in pythons.items()}

    def write(finished: bool) -> dict:
        """The JSON document; written after every run, so an interrupted benchmark keeps what it measured."""
        summary = summarise(runs)
        document = {
            "started": started.isoformat(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat() if finished else None,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "options": {k: v for k, v in vars(args).items() if k not in ("list",)},
            "host": {
                "platform": platform.platform(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "source": source,
            "settings": {st: asdict(common.setting(st, args.quick)) for st in sorted({st for st, _ in pairs})},
            "lora": common.LORA,
            "sides": {name: asdict(SIDES[name]) for name in sorted({sd for _, sd in pairs})},
            "environments": versions,
            "runs": [asdict(r) for r in runs],
            "discarded_busy_runs": [asdict(r) for r in discarded],
            "summary": summary,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(out)
        return summary

    for repeat in range(args.repeats):
        for st, side in pairs:
            environment = SIDES[side].environment
            for attempt in range(1 + args.retry_busy):
                wait_for_idle(args.wait_idle)
                run = Run(repeat=repeat, setting=st, side=side)
                run_side(run, pythons[environment], models[(environment, st)], args, env)
                busy = run.result is not None and (run.foreign_cpu_share or 0) > BUSY_SHARE
                if not busy or attempt == args.retry_busy:
                    break
                discarded.append(run)
                print(f"  {st}/{side}: other processes used {fmt_share(run.foreign_cpu_share)} of the CPUs "
                      f"(total {run.result['total_s']:.2f} s); measuring again", flush=True)
            runs.append(run)
            if run.result:
                r = run.result
                print(f"[{len(runs)}/{total}] {st:<8} {side:<16} total {r['total_s']:.2f} s "
                      f"(generate {r['generation_s']:.2f}, ref {r['reference_s']:.2f}, "
                      f"optimise {r['optimisation_s']:.2f}), peak {r['peak_rss_mb']:.0f} MB, "
                      f"other processes {fmt_share(run.foreign_cpu_share)} of the CPUs", flush=True)
            else:
                print(f"[{len(runs)}/{total}] {st:<8} {side:<16} FAILED: {run.error}", flush=True)
            write(finished=False)

    summary = write(finished=True)
    print_table(summary, args.quick)
    busy = [r for r in runs if (r.foreign_cpu_share or 0) > BUSY_SHARE]
    if busy:
        worst = max(r.foreign_cpu_share for r in busy)
        print(f"\nwarning: other processes used more than {BUSY_SHARE:.0%} of the CPUs during {len(busy)} of "
              f"{len(runs)} runs (up to {worst:.0%}); those times are inflated. Rerun on an idle machine.")
    failed = [r for r in runs if r.result is None]
    print(f"\nwrote {out}")

    if failed:
        print(f"{len(failed)} run(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
