"""One checkpoint and resume scheme for the hand-written loops (SFT, PPO, the reward model), and
the run key and metrics trimming the TRL-based stages share with them.

A run's checkpoints live in one directory:

    checkpoints/run.key                      sha256 of the settings that change what is learned
    checkpoints/checkpoint-N/
        weights.safetensors                  trainable parameters, "<module>.<parameter name>"
        state.safetensors                    every tensor of the loop state (optimizer moments, RNG states)
        state.json                           the rest of the loop state; tensors by their key in state.safetensors
        trainer_state.json                   {"global_step": N}, written last: without it the checkpoint is torn

No pickle anywhere: state that is not a tensor is JSON, and loading reads JSON and safetensors
only. A loop may also save an exportable copy of its model into checkpoint-N (PPO's adapter);
`trainer_state.json` is the same marker HF Trainer writes last, so `resume_point` serves both.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from alignkit.records import atomic_output, write_atomic

MARKER = "trainer_state.json"
WEIGHTS, TENSORS, STATE = "weights.safetensors", "state.safetensors", "state.json"


# ---------------------------------------------------------------------------------------------
# the run directory: run key, complete checkpoints, metrics


def run_key(settings: Any) -> str:
    """The fingerprint of a run's settings (anything JSON-serialisable)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines after `step` (logged after the checkpoint we resume from) and a torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):  # cut by a kill mid-write
            break
        if json.loads(line)["step"] <= step:
            kept.append(line)
    write_atomic(path, "".join(kept))


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("-")[-1])


def resume_point(out_dir: Path, settings: Any, ckpt_dir: Path | None = None, metrics: Path | None = None) -> str | None:
    """The last complete checkpoint of a run with these `settings`, or None after clearing another run's state.

    `settings` holds everything that changes what is learned; another run's checkpoints and metrics
    are removed. Torn checkpoints (no marker) are removed, and the metrics are cut back to the
    checkpoint's step (no checkpoint: no metrics).
    """
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else Path(out_dir) / "checkpoints"
    metrics = Path(metrics) if metrics is not None else Path(out_dir) / "metrics.jsonl"
    fingerprint = run_key(settings)
    key = ckpt_dir / "run.key"
    if not (key.exists() and key.read_text().strip() == fingerprint):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics.unlink(missing_ok=True)
        ckpt_dir.mkdir(parents=True)
        write_atomic(key, fingerprint)
        return None
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if (d / MARKER).exists():
            complete.append(d)
        else:
            shutil.rmtree(d)
    if not complete:
        metrics.unlink(missing_ok=True)
        return None
    last = max(complete, key=checkpoint_step)
    keep_metrics_until(metrics, json.loads((last / MARKER).read_text())["global_step"])
    return str(last)


# ---------------------------------------------------------------------------------------------
# state without pickle: tensors to safetensors, the structure around them to JSON


def to_json(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON, its tensors moved into `tensors` (keyed by where they sat) and referenced by key.

    Tuples and dicts with non-string keys (an optimizer's per-parameter state) are tagged, so
    `from_json` gives back the same types.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, to_json(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path or '<root>'}: cannot store a {type(obj).__name__} without pickle")


def from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `to_json`."""
    if isinstance(obj, list):
        return [from_json(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(from_json(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: from_json(v, tensors) for k, v in obj["__items__"]}
        return {k: from_json(v, tensors) for k, v in obj.items()}
    return obj


def rng_state() -> dict[str, Any]:
    """The global random states: python, numpy, torch CPU and (when present) CUDA."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# save and load


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The parameters that train, keyed "<module>.<parameter name>"."""
    return {f"{name}.{p_name}": p.detach().cpu().contiguous().clone()
            for name, module in modules.items() for p_name, p in module.named_parameters() if p.requires_grad}  # fmt: skip


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    export: Callable[[Path], None] | None = None,
    keep: int = 2,
) -> Path:
    """Write `ckpt_dir/checkpoint-<step>` (see the module docstring) and keep the last `keep` checkpoints.

    `modules` names the models whose trainable parameters are saved; `extra` is the loop's own
    state (JSON, tuples and tensors allowed); `export(path)` may write more into the checkpoint
    (a loadable adapter) before the marker.
    """
    from safetensors.torch import save_file

    path = Path(ckpt_dir) / f"checkpoint-{step}"
    shutil.rmtree(path, ignore_errors=True)  # a torn one from an earlier try
    path.mkdir(parents=True)
    if export is not None:
        export(path)
    with atomic_output(path / WEIGHTS) as tmp:
        save_file(trainable_state(modules), str(tmp))
    tensors: dict[str, torch.Tensor] = {}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "rng": rng_state(), "extra": extra or {}}  # fmt: skip
    structure = to_json(state, tensors)
    with atomic_output(path / TENSORS) as tmp:
        save_file(tensors, str(tmp))
    write_atomic(path / STATE, json.dumps({"step": step, **structure}))
    write_atomic(path / MARKER, json.dumps({"global_step": step}))
    done = sorted((d for d in Path(ckpt_dir).glob("checkpoint-*") if (d / MARKER).exists()), key=checkpoint_step)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return path


def load_checkpoint(
    path: Path,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint written by `save_checkpoint` in place, RNG states included; returns (step, extra)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / WEIGHTS))
    for name, module in modules.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing = {n for n, p in module.named_parameters() if p.requires_grad} - own.keys()
        if missing:
            raise ValueError(f"{path / WEIGHTS}: no weights for {name}: {sorted(missing)[:3]} ...")
        module.load_state_dict(own, strict=False)
    state = from_json(json.loads((path / STATE).read_text()), load_file(str(path / TENSORS)))
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["extra"]
