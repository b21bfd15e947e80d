"""Memory: evaluation batches sized by the cache they hold, and freed heap pages handed back."""

import os
import subprocess
import sys

import pytest
import torch

from tiny import tiny_run_config, tiny_run_settings, write_yaml

from detoxrl.errors import DetoxError
from detoxrl.heap import release_freed_memory
from detoxrl.policy import load_policy
from detoxrl.sampling import MAX_AUTO_BATCH, cache_bytes_per_response, evaluation_batch_size


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers cache holds (an encoder-decoder's has two caches)."""
    parts = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    return sum(t.nbytes for part in parts for layer in part.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_estimate_is_the_cache_generation_holds(tiny_llama, tiny_t5, dtype):
    rows, prompt_tokens, new_tokens = 3, 9, 5
    for path in (tiny_llama, tiny_t5):
        model = load_policy(tiny_run_config(path, "unused").model).model.get_base_model().to(dtype)
        ids = torch.randint(3, 20, (rows, prompt_tokens))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        held = cache_bytes(out.past_key_values)
        if model.config.is_encoder_decoder:
            held += rows * prompt_tokens * model.config.d_model * dtype.itemsize  # the encoder's output
        # The cache holds every position but the last token's, whose keys no later step needed.
        estimate = rows * cache_bytes_per_response(model.config, prompt_tokens, new_tokens, dtype)
        last_position = rows * cache_bytes_per_response(model.config, 0, 1, dtype)
        assert held <= estimate <= held + last_position, path.name


def test_batches_are_sized_by_memory_unless_given(tiny_llama, tiny_t5):
    config = tiny_run_config(tiny_llama, "unused", **{"data.max_prompt_tokens": 60, "generation.max_new_tokens": 4})
    model = load_policy(config.model).model
    per_response = cache_bytes_per_response(model.config, 60, 4, torch.float32)
    config.eval.batch_memory_gb = 10 * per_response / 1e9
    assert evaluation_batch_size(config, model) == 10
    # a model sharing the prompts' cache holds it in fp32 whatever its weights' dtype; T5 holds it in theirs
    assert evaluation_batch_size(config, model.to(torch.bfloat16)) == 10
    t5 = load_policy(tiny_run_config(tiny_t5, "unused").model).model
    config.eval.batch_memory_gb = 10 * cache_bytes_per_response(t5.config, 60, 4, torch.float32) / 1e9
    assert evaluation_batch_size(config, t5) == 10
    assert evaluation_batch_size(config, t5.to(torch.bfloat16)) == 20  # half the bytes per response
    config.eval.batch_memory_gb = None  # the default limit is ample for a tiny model: the cap
    assert evaluation_batch_size(config, model) == MAX_AUTO_BATCH
    config.eval.batch_size = 500  # given without a limit: as given
    assert evaluation_batch_size(config, model) == 500
    config.data.max_prompt_tokens = 10 ** 9  # no response fits the default limit: one at a time, given or not
    assert evaluation_batch_size(config, model) == 500
    config.eval.batch_size = None
    assert evaluation_batch_size(config, model) == 1


def test_a_batch_that_cannot_fit_its_memory_limit_is_refused(tiny_llama):
    config = tiny_run_config(tiny_llama, "unused", **{"data.max_prompt_tokens": 60, "generation.max_new_tokens": 4})
    model = load_policy(config.model).model
    per_response = cache_bytes_per_response(model.config, 60, 4, torch.float32)
    config.eval.batch_size, config.eval.batch_memory_gb = 8, 5.5 * per_response / 1e9
    with pytest.raises(DetoxError, match=r"eval.batch_size \(8\) does not fit eval.batch_memory_gb .*use "
                                         r"eval.batch_size 5 or less"):
        evaluation_batch_size(config, model)
    config.eval.batch_size, config.eval.batch_memory_gb = None, 0.5 * per_response / 1e9
    with pytest.raises(DetoxError, match=r"does not hold one response .* raise it or lower data.max_prompt_tokens"):
        evaluation_batch_size(config, model)


@pytest.mark.parametrize("settings, message", [
    ({"eval.enabled": True, "eval.batch_size": 10 ** 6, "eval.batch_memory_gb": 0.01},
     "eval.batch_size (1000000) does not fit eval.batch_memory_gb (0.01)"),
    ({"eval.batch_memory_gb": -1.0}, "eval.batch_memory_gb must be positive, got -1.0"),
    ({"eval.batch_size": 0}, "eval.batch_size must be at least 1, got 0"),
], ids=["batch-over-limit", "negative-limit", "zero-batch"])
def test_bad_evaluation_batch_settings_are_one_line_errors(settings, message, tiny_t5, tmp_path, run_cli):
    config = write_yaml(tmp_path / "config.yaml", tiny_run_settings(tiny_t5, tmp_path / "run", **settings))
    code, _, err = run_cli(["train", "--config", config])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written, and no training before the refusal


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_freed_heap_pages_go_back_to_the_system():
    """Blocks below malloc's mmap threshold stay resident after they are freed, until released."""
    mapped = torch.ones(1 << 20)
    del mapped  # freeing a 4 MB mapping raises glibc's mmap threshold to 4 MB: 1 MB blocks now come from the heap
    blocks = [torch.ones(1 << 18) for _ in range(200)]  # 200 MB of 1 MB blocks
    before = resident_bytes()
    del blocks[::2]  # every other one: 100 MB of free blocks between live ones, where no trim at the top reaches
    freed = resident_bytes()
    release_freed_memory()
    after = resident_bytes()
    assert before - freed < 30e6  # freeing alone kept them
    assert freed - after > 80e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
@pytest.mark.parametrize("mapped", [True, False])
def test_large_blocks_go_back_to_the_system_when_freed(mapped):
    """After limit_heap_growth a 20 MiB block is mapped on its own, so freeing it returns its pages at once;
    under glibc's default it comes from the heap once a larger block was freed, and stays resident."""
    code = f"""
import resource, torch
from detoxrl.heap import limit_heap_growth
if {mapped}:
    limit_heap_growth()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
larger = torch.ones(6 << 20)  # 24 MiB, then freed: glibc's default threshold rises to 24 MiB
del larger
keep = torch.ones(1 << 10)
block = torch.ones(5 << 20)  # 20 MiB
before = resident()
del block
print(before - resident())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    returned = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env=env).stdout)
    assert (returned > 18e6) if mapped else (returned < 2e6), returned


ONEDNN_GROWTH = """
import ctypes, resource, sys, torch
from detoxrl.heap import limit_heap_growth
if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
    print("no oneDNN bf16"); sys.exit()
if {limited}:
    limit_heap_growth()
torch.set_num_threads(1)
def resident():
    ctypes.CDLL(None).malloc_trim(0)
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
weight = torch.randn(1536, 576, dtype=torch.bfloat16)
def multiply(shapes):
    for rows in shapes:
        torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), weight)
multiply(range(100, 300))
before = resident()
multiply(range(300, 700))  # a new shape each time, as each prompt length is
print(resident() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_bf16_kernels_for_new_shapes_stop_piling_up():
    """oneDNN compiles a bf16 matmul kernel per shape and keeps 1,024 by default: 400 new shapes add ~0.3 GB.
    With limit_heap_growth it keeps 64, and less than half of that stays (a value the user set stays)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda limited, extra={}: subprocess.run(  # noqa: E731
        [sys.executable, "-c", ONEDNN_GROWTH.format(limited=limited)], capture_output=True, text=True, check=True,
        env={**env, **extra}).stdout.strip()
    grown = run(False)
    if grown == "no oneDNN bf16":
        pytest.skip("bf16 matmuls do not go through oneDNN on this CPU")
    if int(grown) < 50e6:
        pytest.skip(f"oneDNN's kernels for 400 new shapes keep only {int(grown) / 1e6:.0f} MB on this CPU")
    limited = run(True)
    assert int(limited) < 0.5 * int(grown), (grown, limited)
    assert int(run(True, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})) > 0.5 * int(grown)


def test_training_without_a_fidelity_term_leaves_rouge_and_scikit_learn_unimported():
    """rouge-score and scikit-learn hold ~0.13 GB once imported; only the fidelity term needs them."""
    probe = ("import sys; import detoxrl.rl.trainer, detoxrl.rewards.composite; "
             "print(sorted(m for m in ('rouge_score', 'sklearn', 'nltk') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from detoxrl.rewards.composite import fidelity_term

    assert fidelity_term(False)(["p"], ["the cat sat"], references=["the cat sat"])[0] == pytest.approx(1.0)
