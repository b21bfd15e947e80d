"""Atomic checkpoints that restore a run exactly, stored without pickle.

A checkpoint is written to a temporary directory and renamed into place, so a crash leaves
either the previous checkpoints or a complete new one. Its files and directory are fsynced before
the rename, and the parent directory after it and before older checkpoints are deleted, so that a
power loss cannot leave a renamed but empty checkpoint as the only one. Tensors go to safetensors
files and everything else to JSON; loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DetoxError
from ..rundir import CHECKPOINT_MARKER, CHECKPOINT_PREFIX, list_checkpoints


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return tensors, {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_py],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = meta["python"]
    random.setstate((version, tuple(internal), gauss_py))


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: Path, keep: int, accelerator: Accelerator, module: torch.nn.Module, optimizer, scheduler,
    state: dict[str, Any],
) -> Path:
    """Write ``root/step-N`` atomically (every rank its RNG; rank 0 the rest); keep the last ``keep``.

    ``state`` is the trainer's JSON-serialisable state and must hold ``step``.
    """
    target = root / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    staging = root / f".tmp-{CHECKPOINT_PREFIX}{state['step']:07d}"
    try:
        return _save(root, keep, target, staging, accelerator, module, optimizer, scheduler, state)
    except OSError as exc:  # e.g. disk full: drop the partial copy, keep the earlier checkpoints
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise DetoxError(
            f"could not write checkpoint {target}: {exc.strerror or exc} (earlier checkpoints are kept)"
        ) from exc


def _save(root, keep, target, staging, acc, module, optimizer, scheduler, state) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    acc.wait_for_everyone()
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, staging / f"rng-{acc.process_index}.safetensors")
    (staging / f"rng-{acc.process_index}.json").write_text(json.dumps(rng_meta))
    for path in (staging / f"rng-{acc.process_index}.safetensors", staging / f"rng-{acc.process_index}.json"):
        fsync(path)  # by the rank that wrote it: on a network file system others may not see its cache
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_file(trainable_state(acc.unwrap_model(module)), staging / "trainable.safetensors")
        opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, staging / "optimizer.safetensors")
        (staging / "optimizer.json").write_text(json.dumps(opt_meta))
        state = {**state, "scheduler": scheduler.state_dict(), "num_processes": acc.num_processes}
        (staging / CHECKPOINT_MARKER).write_text(json.dumps(state))
        for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", CHECKPOINT_MARKER):
            fsync(staging / name)
        fsync(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        fsync(root)  # the rename itself, before the older checkpoints it replaces are deleted
        for old in (list_checkpoints(root)[:-keep] if keep > 0 else []) + unmarked(root):
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return target


def unmarked(root: Path) -> list[Path]:
    """Checkpoint directories without their marker: what a deletion cut short by a kill leaves (a checkpoint
    gets its final name only once complete), never a checkpoint to resume from."""
    return [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and not (p / CHECKPOINT_MARKER).is_file()]


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load(directory: Path, acc: Accelerator, module: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this rank's RNG; return the trainer's saved state."""
    try:
        state = json.loads((directory / CHECKPOINT_MARKER).read_text())
        if state.get("num_processes", 1) != acc.num_processes:
            raise DetoxError(
                f"checkpoint {directory} was written by {state['num_processes']} process(es); "
                f"resume it with the same number (now {acc.num_processes})"
            )
        params = load_file(directory / "trainable.safetensors")
        named = dict(acc.unwrap_model(module).named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in params]
        if missing or any(n not in named or named[n].shape != t.shape for n, t in params.items()):
            raise DetoxError(f"checkpoint {directory} does not match this model's adapter")
        with torch.no_grad():
            for name, tensor in params.items():
                named[name].copy_(tensor)
        optimizer_state = unflatten_optimizer(
            load_file(directory / "optimizer.safetensors"), json.loads((directory / "optimizer.json").read_text())
        )
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        rank = acc.process_index
        set_rng_state(
            load_file(directory / f"rng-{rank}.safetensors"),
            json.loads((directory / f"rng-{rank}.json").read_text()),
        )
        return state
    except DetoxError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise DetoxError(f"checkpoint {directory} is corrupt or incomplete ({type(exc).__name__}); "
                         "delete it to resume from an earlier one") from exc
