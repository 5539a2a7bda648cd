"""The hand-written loops' checkpoints: a round trip restores weights, optimizer, scheduler and RNG;
torn checkpoints and torn metric lines are ignored; nothing is pickled."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from alignkit.models.checkpoint import (
    MARKER,
    from_json,
    keep_metrics_until,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    to_json,
)


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model[0].bias.requires_grad_(False)  # frozen parameters are not saved
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _draws() -> list[float]:
    return [torch.rand(1).item(), random.random(), float(np.random.rand())]


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 3)
    loop_rng = random.Random(7)
    loop_rng.random()
    path = save_checkpoint(tmp_path, 3, modules={"model": model}, optimizer=optimizer, scheduler=scheduler,
                           extra={"order": [3, 1, 2], "rng": loop_rng.getstate(), "kl": 0.5})  # fmt: skip
    saved_groups, saved_sched = copy.deepcopy(optimizer.state_dict()["param_groups"]), scheduler.state_dict()
    # what the uninterrupted run does next: random draws, two more steps
    expected_draws, expected_loop = _draws(), loop_rng.random()
    _train(model, optimizer, scheduler, 2)

    fresh, fresh_opt, fresh_sched = _setup(0)  # the same frozen weights, as a loop rebuilds them ...
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()  # ... but the trained ones must come from the checkpoint
    _draws()  # and the global RNGs elsewhere
    step, extra = load_checkpoint(path, modules={"model": fresh}, optimizer=fresh_opt, scheduler=fresh_sched)
    assert step == 3 and extra["order"] == [3, 1, 2] and extra["kl"] == 0.5
    assert fresh_opt.state_dict()["param_groups"] == saved_groups
    assert fresh_sched.state_dict() == saved_sched
    resumed_rng = random.Random()
    resumed_rng.setstate(extra["rng"])
    assert _draws() == expected_draws and resumed_rng.random() == expected_loop
    _train(fresh, fresh_opt, fresh_sched, 2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_optimizer_state_survives_exactly(tmp_path):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path, 2, modules={"model": model}, optimizer=optimizer, scheduler=scheduler)
    fresh, fresh_opt, fresh_sched = _setup(1)
    load_checkpoint(path, modules={"model": fresh}, optimizer=fresh_opt, scheduler=fresh_sched)
    before, after = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert before.keys() == after.keys() == {0, 1, 2}  # integer keys: the state is matched to its parameter
    for i in before:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(before[i][name], after[i][name]), (i, name)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(trained, [p for p in fresh.parameters() if p.requires_grad]))
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, 1, modules={"model": model}, optimizer=optimizer, scheduler=scheduler,
                           extra={"rng": random.Random(0).getstate()})  # fmt: skip
    files = sorted(p.name for p in path.iterdir())
    assert files == sorted(["weights.safetensors", "state.safetensors", "state.json", MARKER])
    for f in path.iterdir():
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert _tensors(f)  # a safetensors file, which cannot hold code
        assert not f.read_bytes().startswith((b"\x80", b"PK"))  # neither a pickle nor torch.save's zip
    assert set(_tensors(path / "weights.safetensors")) == {"model.0.weight", "model.2.weight", "model.2.bias"}
    with pytest.raises(TypeError, match="without pickle"):
        to_json({"fn": object()}, {})


def test_a_torn_checkpoint_is_ignored_and_the_previous_one_used(tmp_path):
    model, optimizer, _ = _setup(0)
    settings = {"lr": 1e-2}
    ckpt = tmp_path / "checkpoints"
    assert resume_point(tmp_path, settings) is None  # a new run: writes the run key
    metrics = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        save_checkpoint(ckpt, step, modules={"model": model}, optimizer=optimizer, extra={"at": step})
        with metrics.open("a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    (ckpt / "checkpoint-2" / MARKER).unlink()  # killed while writing checkpoint-2
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')  # ... and a torn metrics line
    last = resume_point(tmp_path, settings)
    assert last == str(ckpt / "checkpoint-1") and not (ckpt / "checkpoint-2").exists()
    assert load_checkpoint(last, modules={"model": model}, optimizer=optimizer)[1] == {"at": 1}
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1]
    # other settings start over: checkpoints and metrics go
    assert resume_point(tmp_path, {"lr": 1e-3}) is None
    assert not list(ckpt.glob("checkpoint-*")) and not metrics.exists()


def test_only_the_last_checkpoints_are_kept(tmp_path):
    model, optimizer, _ = _setup(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules={"model": model}, optimizer=optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_metrics_trimming_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    keep_metrics_until(path, 3)
    assert path.read_text() == "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"st')
    keep_metrics_until(path, 10)
    assert path.read_text() == json.dumps({"step": 1}) + "\n"


def test_json_encoding_keeps_tuples_integer_keys_and_tensors():
    state = {"a": (1, (2.5, None)), 3: {"x": torch.arange(3)}, "__odd": [True, "s"]}
    tensors: dict = {}
    back = from_json(json.loads(json.dumps(to_json(state, tensors))), tensors)
    assert back["a"] == (1, (2.5, None)) and back["__odd"] == [True, "s"] and torch.equal(back[3]["x"], torch.arange(3))
