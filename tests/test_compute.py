"""The `train` section's precision and memory keys reach every loader and loop: `mixed_precision`
sets accelerate's (and TRL's) precision, `gradient_checkpointing` turns checkpointing on without
changing what is learned, `attn_implementation` is the attention kernel the models load with, and
what cannot run here is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.errors import ModelError, SetupError
from alignkit.models import device
from alignkit.train import sft as sft_module
from alignkit.train.config import SftConfig, TrainConfig


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from alignkit.records import write_jsonl
    from alignkit.sample.templates import load_template
    from alignkit.worlds.shapes import make_shapes_prompts, sft_examples

    tmp = tmp_path_factory.mktemp("sft-data")
    rows = sft_examples(make_shapes_prompts(tmp, 8, seed=3), load_template("cot"), 0.5, seed=3)
    return write_jsonl(tmp / "sft.jsonl", rows)


def _train(sft_data, out, compute: device.ComputeSettings, monkeypatch, steps: int = 2):
    """One short SFT run; returns its per-step losses and what the loop asked accelerate and the loader for."""
    seen = {}
    make, load = sft_module.make_accelerator, __import__("alignkit.models", fromlist=["load_policy"]).load_policy

    def spy_accelerator(settings, loop):
        seen["accelerator"] = acc = make(settings, loop)
        return acc

    def spy_load(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        seen["model"] = model
        return model, processor

    monkeypatch.setattr(sft_module, "make_accelerator", spy_accelerator)
    monkeypatch.setattr("alignkit.models.load_policy", spy_load)
    cfg = SftConfig(data=str(sft_data), max_steps=steps, batch_size=4, warmup_steps=0, save_steps=100)
    sft_module.train_sft(sft_data, out, cfg, model="tiny:qwen2-vl", logging_steps=1, compute=compute)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, seen


def test_compute_settings_come_from_the_train_section():
    train = TrainConfig(mixed_precision="bf16", gradient_checkpointing=True, attn_implementation="eager")
    settings = device.ComputeSettings.of(train)
    assert (settings.precision(), settings.checkpointing(), settings.load_options()) == \
        ("bf16", True, {"attn_implementation": "eager"})  # fmt: skip
    assert device.ComputeSettings().load_options() == {}  # transformers' default kernel
    assert device.ComputeSettings().checkpointing() is torch.cuda.is_available()  # on with a GPU only


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer to fp16")
def test_fp16_without_a_gpu_is_a_clear_error(tmp_path):
    from alignkit.train.common import dpo_config

    with pytest.raises(SetupError, match="train.mixed_precision: fp16 needs a CUDA GPU"):
        dpo_config(tmp_path, TrainConfig(mixed_precision="fp16"), seed=0, logging_steps=1)


def test_trl_trainers_get_the_precision_and_checkpointing(tmp_path):
    from alignkit.train.common import dpo_config

    args = dpo_config(tmp_path, TrainConfig(mixed_precision="bf16", gradient_checkpointing=True), seed=0, logging_steps=1)
    assert args.bf16 and not args.fp16 and args.gradient_checkpointing
    args = dpo_config(tmp_path, TrainConfig(mixed_precision="no", gradient_checkpointing=False), seed=0, logging_steps=1)
    assert not args.bf16 and not args.gradient_checkpointing


@pytest.mark.slow
def test_the_sft_loop_runs_as_the_keys_say(sft_data, tmp_path, monkeypatch):
    plain, seen = _train(sft_data, tmp_path / "plain", device.ComputeSettings("no", False, "eager"), monkeypatch)
    assert seen["accelerator"].mixed_precision == "no" and not seen["model"].is_gradient_checkpointing
    assert seen["model"].config._attn_implementation == "eager"

    # checkpointing recomputes the same activations: the same losses, step for step
    ckpt, seen = _train(sft_data, tmp_path / "ckpt", device.ComputeSettings("no", True, "eager"), monkeypatch)
    assert seen["model"].is_gradient_checkpointing
    assert ckpt == pytest.approx(plain, rel=1e-5)

    # bf16 on a CPU: accelerate's autocast, float32 weights; the losses move by bf16 rounding only
    bf16, seen = _train(sft_data, tmp_path / "bf16", device.ComputeSettings("bf16", False, "sdpa"), monkeypatch)
    assert seen["accelerator"].mixed_precision == "bf16" and seen["model"].dtype == torch.float32
    assert seen["model"].config._attn_implementation == "sdpa"
    assert bf16 != plain and bf16 == pytest.approx(plain, rel=0.05)


def test_an_attention_kernel_that_cannot_run_is_a_clear_error(tiny_qwen_dir):
    from alignkit.models import load_policy

    with pytest.raises(ModelError, match="train.attn_implementation: 'flash_attention_2' cannot load"):
        load_policy(str(tiny_qwen_dir), attn_implementation="flash_attention_2")


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                            ("zero3", "DEEPSPEED")])  # fmt: skip
def test_the_shipped_accelerate_configs_load_as_what_they_say(name, kind):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"]
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_hand_written_loops_refuse_sharded_set_ups():
    from accelerate.utils import DistributedType

    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        device.require_replicated(ok.value, "sft")
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(SetupError, match=f"the sft loop runs with DDP .* asks for {sharded.value}"):
            device.require_replicated(sharded.value, "sft")


def test_no_loop_places_a_model_by_hand():
    """Devices come from accelerate: no `.to("cuda")`, `.cuda()` or `device="cpu"` anywhere in alignkit
    (a weights file read onto the CPU to list its keys, `map_location`, is not a placement)."""
    import re
    from pathlib import Path

    import alignkit

    by_hand = re.compile(r"""\.to\(\s*["'](cuda|cpu)|\.cuda\(|device\s*=\s*["'](cuda|cpu)""")
    found = [f"{path.name}:{n}: {line.strip()}" for path in Path(alignkit.__file__).parent.rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1) if by_hand.search(line)]  # fmt: skip
    assert found == []


def test_inference_models_go_where_accelerate_says(tiny_qwen_dir, monkeypatch):
    from alignkit.sample.transformers_backend import TransformersBackend

    asked, original = [], device.process_state

    def spy():
        state = original()
        asked.append(state.device)
        return state

    monkeypatch.setattr(device, "process_state", spy)
    backend = TransformersBackend(str(tiny_qwen_dir), max_new_tokens=2)
    assert asked and backend.model.device == asked[0]  # the sampler (and eval, PPO's scorer) ask accelerate
