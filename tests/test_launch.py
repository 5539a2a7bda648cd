"""Many processes (`launch.num_processes`): the sft stage and the train stage (DPO, MM-DPO) as 2 real
gloo processes train like 1 process with the same global batch (sft's phases too); sft resumes across process counts,
a killed 2-process train run resumes from its checkpoint, and a failing launch is a clear error.
Device and precision come from accelerate's state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alignkit.launch import LaunchConfig, command
from alignkit.models import device
from alignkit.recipe import load_recipe
from alignkit.runner import Runner
from alignkit.train import sft as sft_module

# Same global batch, other split: the gradients are all-reduced in fp32 over gloo and the padding
# differs (each process pads its own half), so the losses agree to float rounding, not bit for bit.
REL_TOL = 1e-5

RECIPE = """\
output_dir: {out}
stages: [sft]
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 2}}}}
sft:
  synthetic: {{num_examples: 32}}
  max_steps: 4
  batch_size: {batch}
  warmup_steps: 1
  logging_steps: 1
  save_steps: {save}
"""


def _recipe(tmp_path, name: str, batch: int, save: int = 100):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / name, batch=batch, save=save))
    return path


def alignkit_run(recipe, *args: str) -> subprocess.CompletedProcess:
    """`alignkit run RECIPE ARGS` as its own process (one thread per process), its output captured."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe), *args],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def _cli(recipe, *overrides: str) -> subprocess.CompletedProcess:
    return alignkit_run(recipe, "--stages", "sft", *overrides)


def run_until_checkpoint(recipe, checkpoints, *args: str) -> subprocess.Popen:
    """Start `alignkit run RECIPE ARGS` in a session of its own and return once `checkpoints` holds a
    complete checkpoint (the caller kills it)."""
    import time

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", "run", str(recipe), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    return proc


def spy_on_accelerator(monkeypatch, module) -> dict:
    """Replace `module.make_accelerator` with one that records the accelerator it makes
    (`seen["accelerator"]`) and where `prepare` put the first model (`seen["model_device"]`, and
    `seen["head_device"]` for a model with a reward head)."""
    seen: dict = {}

    def spy(settings, loop):
        acc = device.make_accelerator(settings, loop)
        prepare = acc.prepare

        def prepared(*objs):
            out = prepare(*objs)
            seen["model_device"] = next(out[0].parameters()).device
            if hasattr(out[0], "head"):
                seen["head_device"] = out[0].head.weight.device
            return out

        acc.prepare = prepared
        seen["accelerator"] = acc
        return acc

    monkeypatch.setattr(module, "make_accelerator", spy)
    return seen


def mark_lines_before(metrics) -> None:
    """Mark the complete metric lines written before a kill `before`: a resumed run keeps those up to
    its checkpoint, a fresh start would rewrite them."""
    metrics.write_text("".join(json.dumps(json.loads(line) | {"before": True}) + "\n"
                               for line in metrics.read_text().splitlines(keepends=True) if line.endswith("\n")))  # fmt: skip


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, batch 4 (in this process, through the runner)."""
    tmp = tmp_path_factory.mktemp("one")
    Runner(load_recipe(_recipe(tmp, "one", batch=4))).run()
    return tmp / "one"


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(one_process, tmp_path):
    done = _cli(_recipe(tmp_path, "two", batch=2), "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "two"
    summary = json.loads((run / "stages.json").read_text())["sft"]["summary"]
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 4  # the world size the stage saw
    assert json.loads((one_process / "stages.json").read_text())["sft"]["summary"]["num_processes"] == 1

    one, two = _losses(one_process), _losses(run)
    assert len(one) == len(two) == 4
    diffs = [(abs(a - b), abs(a - b) / abs(a)) for a, b in zip(one, two)]
    print("per-step |loss diff| (abs, rel):", [(f"{d:.2e}", f"{r:.2e}") for d, r in diffs])
    assert two == pytest.approx(one, rel=REL_TOL)

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    w1, w2 = load_file(one_process / "sft/model/model.safetensors"), load_file(run / "sft/model/model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4  # the same weights after 4 steps
    model = AutoModelForImageTextToText.from_pretrained(run / "sft" / "model")
    processor = AutoProcessor.from_pretrained(run / "sft" / "model")
    ids = processor(text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3).shape[1] > ids["input_ids"].shape[1]
    assert not (run / "sft" / "model.summary.json").exists()  # read and removed by the runner


@pytest.mark.slow
def test_a_run_resumes_with_another_process_count_and_the_same_global_batch(one_process, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, "resumed", batch=4, save=2)
    calls = {"n": 0}
    real = sft_module.collate

    def crash_on_third(batch, pad_id):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in step 3, after the step-2 checkpoint
        return real(batch, pad_id)

    monkeypatch.setattr(sft_module, "collate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(recipe)).run()
    run = tmp_path / "resumed"
    assert (run / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    metrics = run / "sft" / "metrics.jsonl"
    # mark the lines before the checkpoint: a resumed run keeps them, a fresh start would rewrite them
    metrics.write_text("".join(json.dumps(json.loads(line) | {"before": True}) + "\n"
                               for line in metrics.read_text().splitlines()))  # fmt: skip

    done = _cli(recipe, "launch.num_processes=2", "sft.batch_size=2")  # 2 x 2: the same global batch
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(l["step"], l.get("before", False)) for l in lines] == [(1, True), (2, True), (3, False), (4, False)]
    assert [l["loss"] for l in lines] == pytest.approx(_losses(one_process), rel=REL_TOL)


@pytest.mark.slow
def test_sft_phases_as_two_processes_train_like_one(tmp_path):
    """A curriculum (`sft.phases`) under a launch: every phase runs in both processes, the second
    from the first's model, and each ends where one process with the same global batch ends."""
    phase = "sft.phases=[{synthetic: {tasks: [exists], seed: 5}, max_steps: 2}]"
    one = _cli(_recipe(tmp_path, "one", batch=4), phase)
    two = _cli(_recipe(tmp_path, "two", batch=2), phase, "launch.num_processes=2")
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    from safetensors.torch import load_file

    stages = json.loads((tmp_path / "two" / "stages.json").read_text())
    assert stages["sft:phase-1"]["summary"]["num_processes"] == stages["sft"]["summary"]["num_processes"] == 2
    assert stages["sft"]["summary"]["phases"] == 2
    for sub, steps in (("sft/phase-1", 4), ("sft", 2)):
        losses = [[json.loads(line)["loss"] for line in (tmp_path / run / sub / "metrics.jsonl").read_text().splitlines()]
                  for run in ("one", "two")]  # fmt: skip
        assert len(losses[0]) == steps and losses[1] == pytest.approx(losses[0], rel=REL_TOL)
        w1, w2 = (load_file(tmp_path / run / sub / "model" / "model.safetensors") for run in ("one", "two"))
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.slow
def test_a_failing_launch_names_the_stage_and_its_log(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": []}) + "\n")  # no completion: every process stops on it
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
output_dir: {tmp_path / "run"}
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 2}}}}
sft: {{data: {bad}, max_steps: 1}}
""")
    done = _cli(recipe, "launch.num_processes=2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "stage 'sft' failed in 2 processes" in done.stderr
    log = tmp_path / "run" / "sft" / "model.launch.log"
    assert str(log) in " ".join(done.stderr.split()) and "missing key(s)" in log.read_text()
    assert json.loads((tmp_path / "run" / "stages.json").read_text())["sft"]["status"] == "running"


def test_the_launch_command():
    args = ["--stage", "sft"]
    torchrun = command(LaunchConfig(num_processes=2), args)
    assert torchrun[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert torchrun[-4:] == ["-m", "alignkit.worker", "--stage", "sft"]
    accel = command(LaunchConfig(num_processes=4, config_file="acc.yaml"), args)
    assert accel[1:7] == ["-m", "accelerate.commands.launch", "--config_file", "acc.yaml", "--num_processes", "4"]


def test_precision_comes_from_the_hardware_and_accelerate(monkeypatch):
    auto = device.ComputeSettings()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto.precision() == "no"  # fp32 on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto.precision() == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto.precision() == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --config_file` passes on
    assert auto.precision() == "fp16"
    assert device.ComputeSettings("bf16").precision() == "bf16"  # the recipe's explicit choice wins


@pytest.mark.slow
def test_sft_asks_accelerate_where_to_put_its_model(tiny_qwen_dir, tmp_path, monkeypatch):
    from alignkit.records import write_jsonl
    from alignkit.sample.templates import load_template
    from alignkit.train.config import SftConfig
    from alignkit.worlds.shapes import make_shapes_prompts, sft_examples

    data = write_jsonl(tmp_path / "sft.jsonl",
                       sft_examples(make_shapes_prompts(tmp_path, 4, seed=3), load_template("cot"), 0.5, seed=3))  # fmt: skip
    seen = spy_on_accelerator(monkeypatch, sft_module)
    sft_module.train_sft(data, tmp_path / "run", SftConfig(data=str(data), max_steps=1, batch_size=2),
                         model=str(tiny_qwen_dir))  # fmt: skip
    acc = seen["accelerator"]
    assert seen["model_device"] == acc.device  # placed by accelerate.prepare, not by the loop
    assert acc.mixed_precision == device.ComputeSettings().precision()  # "no" here: no GPU
    source = (sft_module.__file__ and open(sft_module.__file__).read())
    assert '"cuda"' not in source and '"cpu"' not in source and ".cuda(" not in source


@pytest.mark.slow
def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tiny_qwen_dir, tmp_path):
    """batch 2 × grad_accum 2 = batch 4: the loss is normalised over the global batch's tokens."""
    from alignkit.records import write_jsonl
    from alignkit.sample.templates import load_template
    from alignkit.train.config import SftConfig
    from alignkit.worlds.shapes import make_shapes_prompts, sft_examples

    data = write_jsonl(tmp_path / "sft.jsonl",
                       sft_examples(make_shapes_prompts(tmp_path, 8, seed=3), load_template("cot"), 0.5, seed=3))  # fmt: skip
    losses = {}
    for name, batch, accum in (("whole", 4, 1), ("accumulated", 2, 2)):
        cfg = SftConfig(data=str(data), max_steps=3, batch_size=batch, grad_accum=accum, warmup_steps=1)
        sft_module.train_sft(data, tmp_path / name, cfg, model=str(tiny_qwen_dir), logging_steps=1)
        losses[name] = _losses_of(tmp_path / name / "metrics.jsonl")
    assert losses["accumulated"] == pytest.approx(losses["whole"], rel=REL_TOL)


def _losses_of(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the train stage: DPO and MM-DPO as 2 processes

TRAIN_RECIPE = """\
output_dir: {out}
stages: [train]
policy: {{model: "tiny:qwen2-vl"}}
data: {{synthetic: {{num_prompts: 2}}}}
train: {{method: {method}, max_steps: {steps}, batch_size: {batch}, learning_rate: 0.001, save_steps: {save}}}
"""


def _train_run(tmp_path, name: str, method: str, batch: int, steps: int = 4, save: int = 100, pairs: int = 8):
    """A recipe whose run directory already holds a pairs file (varied margins: MM-DPO's beta varies)."""
    from tests.test_train_dpo import _write_pairs

    run = tmp_path / name
    run.mkdir()
    path = _write_pairs(run, pairs)
    lines = [json.loads(line) | {"margin": 0.5 * i} for i, line in enumerate(path.read_text().splitlines())]
    path.write_text("".join(json.dumps(p) + "\n" for p in lines))
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(TRAIN_RECIPE.format(out=run, method=method, steps=steps, batch=batch, save=save))
    return recipe, run


def _train_cli(recipe, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe), "--stages", "train", *overrides],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def _train_losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _check_adapter_generates(adapter) -> None:
    from peft import PeftModel

    from alignkit.models import load_policy, load_processor, resolve_model

    base, _ = load_policy(resolve_model("tiny:qwen2-vl"))
    model = PeftModel.from_pretrained(base, str(adapter))
    processor = load_processor(adapter)
    ids = processor(text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3).shape[1] > ids["input_ids"].shape[1]


def _compare(one: list[float], two: list[float]) -> None:
    assert len(one) == len(two) == 4
    diffs = [(abs(a - b), abs(a - b) / abs(a)) for a, b in zip(one, two)]
    print("per-step |loss diff| (abs, rel):", [(f"{d:.2e}", f"{r:.2e}") for d, r in diffs])
    assert two == pytest.approx(one, rel=REL_TOL, abs=1e-6)
    assert len(set(one)) > 1  # the steps trained (learning rate 1e-3): not one loss repeated


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "mmdpo"])
def test_train_as_two_processes_trains_like_one_with_the_same_global_batch(method, tmp_path):
    one_recipe, one = _train_run(tmp_path, "one", method, batch=2)
    Runner(load_recipe(one_recipe)).run()
    two_recipe, two = _train_run(tmp_path, "two", method, batch=1)
    done = _train_cli(two_recipe, "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr

    summary = json.loads((two / "stages.json").read_text())["train"]["summary"]
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 2
    assert json.loads((one / "stages.json").read_text())["train"]["summary"]["num_processes"] == 1
    _compare(_train_losses(one), _train_losses(two))
    assert not list((two / "train").glob("adapter.tmp")) and not (two / "train" / "adapter.summary.json").exists()
    _check_adapter_generates(two / "train" / "adapter")
    if method == "mmdpo":  # the reference log-probs the main process cached are a 1-process run's
        from alignkit.train.reference import read_cache

        (c1,), (c2,) = (one / "ref_logps").glob("*.jsonl"), (two / "ref_logps").glob("*.jsonl")
        r1, r2 = read_cache(c1), read_cache(c2)
        assert r1.keys() == r2.keys() and len(r1) == 8 and len(c2.read_text().splitlines()) == 8  # written once
        flat1, flat2 = [v for k in r1 for v in r1[k]], [v for k in r1 for v in r2[k]]
        print("reference log-probs, max |diff|:", max(abs(a - b) for a, b in zip(flat1, flat2)))
        assert flat2 == pytest.approx(flat1, rel=REL_TOL)
        betas = [json.loads(line)["beta/max"] for line in (two / "train" / "metrics.jsonl").read_text().splitlines()]
        assert len(set(betas)) > 1  # per-pair betas reached the processes' batches


@pytest.mark.slow
def test_a_killed_two_process_train_run_resumes_from_its_checkpoint(tmp_path):
    import signal

    recipe, run = _train_run(tmp_path, "killed", "dpo", batch=1, steps=12, save=2, pairs=24)
    proc = run_until_checkpoint(recipe, run / "train" / "checkpoints", "--stages", "train", "launch.num_processes=2")
    import psutil

    # torchrun killed alone (as the OOM killer would): it cannot stop its workers, the kernel does
    launcher = next(p for p in psutil.Process(proc.pid).children() if "torch.distributed.run" in p.cmdline())
    workers = launcher.children(recursive=True)
    assert len(workers) >= 2
    launcher.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], f"workers still running after their launcher was killed: {alive}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed in the middle of training: orphaned workers would have trained on to the end
    assert not (run / "train" / "adapter").exists(), "the workers went on training after their launcher died"
    metrics = run / "train" / "metrics.jsonl"
    mark_lines_before(metrics)

    done = _train_cli(recipe, "launch.num_processes=2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed_from = max(l["step"] for l in lines if l.get("before"))
    assert 2 <= resumed_from < 12 and resumed_from % 2 == 0  # the last complete checkpoint's step
    assert [(l["step"], l.get("before", False)) for l in lines] == [(s, s <= resumed_from) for s in range(1, 13)]
    assert json.loads((run / "stages.json").read_text())["train"]["status"] == "done"
    _check_adapter_generates(run / "train" / "adapter")
    # the resumed run continues the interrupted one: the losses of an uninterrupted 1 x 2 run
    ref_recipe, ref = _train_run(tmp_path, "uninterrupted", "dpo", batch=2, steps=12, save=100, pairs=24)
    Runner(load_recipe(ref_recipe)).run()
    resumed, whole = [l["loss"] for l in lines], _train_losses(ref)
    print("resumed vs uninterrupted, max |loss diff|:", max(abs(a - b) for a, b in zip(resumed, whole)))
    assert resumed == pytest.approx(whole, rel=REL_TOL, abs=1e-6)


def test_train_runs_distributed_for_every_method(tmp_path):
    from alignkit.train.stage import TrainStage

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TRAIN_RECIPE.format(out=tmp_path / "run", method="dpo", steps=1, batch=1, save=1))
    for method in ("dpo", "mmdpo", "ppo"):
        r = load_recipe(recipe, [f"train.method={method}", "launch.num_processes=2"])
        assert TrainStage().distributed(r)
        assert "launch" in TrainStage().config(r)  # the global batch depends on it
