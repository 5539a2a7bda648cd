"""MM-DPO: the per-pair beta, its loss against TRL's and a hand computation, the reference cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.records import RecordError
from alignkit.train.config import TrainConfig
from alignkit.train.mmdpo import dynamic_beta, train_mmdpo

COLORS = ["red", "blue", "green", "yellow"]
MARGINS = [0.0, 0.5, 2.0, 6.0]


def _write_pairs(dir: Path) -> Path:
    lines = []
    for i, margin in enumerate(MARGINS):
        image = dir / f"img{i}.png"
        Image.new("RGB", (112, 112), COLORS[i]).save(image)
        pair = {
            "pair_id": f"q{i}#s0>q{i}#s1",
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"There is a {COLORS[i]} square."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "There is a purple triangle" + " x" * i}]}],
            "images": [image.name],
            "margin": margin,
            "rm_margin": -margin,
        }
        lines.append(json.dumps(pair) + "\n")
    path = dir / "pairs.jsonl"
    path.write_text("".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# the per-pair beta and argument errors


def test_dynamic_beta_follows_the_paper_formula():
    assert dynamic_beta(3.0, beta=0.1, w=0.0) == 0.1  # w = 0 is plain DPO
    assert dynamic_beta(0.0) == 0.1
    assert dynamic_beta(2.0) == pytest.approx(0.1 * (1 + 0.5 * (1 - math.exp(-1.0))))
    assert dynamic_beta(1e6) == pytest.approx(0.15)  # saturates at β_ori·(1 + w)
    assert dynamic_beta(-5.0) == 0.1  # a reward model disagreeing with the judge never lowers β


def test_qlora_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the error is for machines without CUDA")
    with pytest.raises(RuntimeError, match="QLoRA .* needs a CUDA GPU, and none is visible"):
        train_mmdpo(_write_pairs(tmp_path), tmp_path / "run", TrainConfig(method="mmdpo", finetune="qlora"), model=str(tmp_path))


def test_margin_key_must_name_a_numeric_column(tmp_path):
    pairs = _write_pairs(tmp_path)
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: missing key\(s\) \['reward'\]"):
        train_mmdpo(pairs, tmp_path / "run", TrainConfig(method="mmdpo", margin_key="reward"), model=str(tmp_path))
    with pytest.raises(ValueError, match="finetune"):
        TrainConfig(method="mmdpo", finetune="dora")


def test_recipe_method_mmdpo_dispatches_with_its_keys(tmp_path, monkeypatch):
    import alignkit.train.mmdpo as mmdpo
    from alignkit.recipe import Recipe
    from alignkit.runner import Runner

    calls = []
    monkeypatch.setattr(mmdpo, "train_mmdpo", lambda *a, **kw: calls.append((a, kw)) or tmp_path / "train" / "adapter")
    train = {"method": "mmdpo", "w": 0.25, "k": 1.0, "gamma": 0.1, "margin_key": "rm_margin", "finetune": "full"}
    recipe = Recipe.model_validate({"output_dir": str(tmp_path), "data": {"synthetic": {}}, "train": train})
    _write_pairs(tmp_path)
    Runner(recipe).run(["train"])
    (pairs, out_dir, cfg), kw = calls[0]
    assert cfg.model_dump(include=set(train)) == train
    assert kw["ref_cache_dir"] == tmp_path / "ref_logps" and out_dir == tmp_path / "train"


# ---------------------------------------------------------------------------------------------
# reference values on a tiny VLM


class _RecordLogsigmoid:
    """Stands in for `torch.nn.functional` inside TRL's trainer, keeping each per-pair logsigmoid."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def logsigmoid(self, x):
        out = torch.nn.functional.logsigmoid(x)
        self.calls.append(out.detach())
        return out


def _hand_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens from plain logits, and the completion mask."""
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask", "beta", "ref_chosen_logps", "ref_rejected_logps")}
    logits = model(**kwargs).logits[:, :-1]
    logp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    return logp * mask, mask


def _perturb_adapter(model) -> None:
    """Random LoRA B weights (seeded), so that policy and reference differ."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05


@pytest.mark.slow
def test_loss_equals_trl_at_w0_and_the_hand_formula(tmp_path, tiny_qwen_dir, monkeypatch):
    import trl.trainer.dpo_trainer as trl_dpo
    from trl import DPOConfig, DPOTrainer

    from alignkit.data.preference import COLUMNS, load_preference_dataset
    from alignkit.models import load_policy, lora_config
    from alignkit.train.mmdpo import PAIR_COLUMNS, MMDPOTrainer
    from alignkit.train.reference import pair_key, read_cache

    w, k, gamma = 0.5, 0.5, 0.3
    ds = load_preference_dataset(_write_pairs(tmp_path), keep={"pair_id": str, "margin": float})
    config = dict(output_dir=str(tmp_path / "out"), beta=0.1, per_device_train_batch_size=4, bf16=False, report_to="none")

    model, processor = load_policy(str(tiny_qwen_dir))
    stock = DPOTrainer(model=model, args=DPOConfig(**config), train_dataset=ds.select_columns(list(COLUMNS)),
                       processing_class=processor, peft_config=lora_config())  # fmt: skip
    model, processor = load_policy(str(tiny_qwen_dir))
    ours = MMDPOTrainer(
        model=model,
        args=DPOConfig(**config, loss_type=["sigmoid", "sft"], loss_weights=[1.0, gamma]),
        train_dataset=ds.add_column("beta", [dynamic_beta(m, 0.1, w, k) for m in MARGINS]),
        processing_class=processor,
        peft_config=lora_config(),
    )
    _perturb_adapter(stock.model)
    _perturb_adapter(ours.model)
    keys = [pair_key(*r) for r in zip(*(ds[c] for c in ("pair_id", *COLUMNS)))]
    cache = tmp_path / "ref.jsonl"
    ours.cache_reference_logps(cache, keys)

    # stock TRL: its per-pair sigmoid loss, and the reference log-probs of its in-step forward
    record = _RecordLogsigmoid()
    monkeypatch.setattr(trl_dpo, "F", record)
    in_step_refs = []
    stock.model.register_forward_hook(lambda m, a, out: None if torch.is_grad_enabled() else in_step_refs.append(out.log_probs.sum(1)))
    stock_batch = stock._prepare_inputs(stock.data_collator([ds.select_columns(list(COLUMNS))[i] for i in range(4)]))
    stock.compute_loss(stock.model, stock_batch)
    trl_losses = -record.calls[-1]

    # the cache holds exactly the reference log-probs TRL computes in-step
    cached = torch.tensor([read_cache(cache)[key] for key in keys])
    torch.testing.assert_close(cached[:, 0], in_step_refs[0][:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached[:, 1], in_step_refs[0][4:], rtol=0, atol=1e-5)

    rows = ours.train_dataset.select_columns([*COLUMNS, *PAIR_COLUMNS])
    batch = ours._prepare_inputs(ours.data_collator([rows[i] for i in range(4)]))

    # w = 0: the per-pair loss is TRL's sigmoid DPO loss
    loss = ours.compute_loss(ours.model, {**batch, "beta": torch.full((4,), 0.1)})
    torch.testing.assert_close(-record.calls[-1], trl_losses, rtol=0, atol=1e-5)

    # w > 0: the formula by hand, from log-probs of plain logits (policy, and adapter disabled)
    loss = ours.compute_loss(ours.model, dict(batch))
    with torch.no_grad():
        policy_tokens, mask = _hand_logps(ours.model, batch)
        with ours.model.disable_adapter():
            ref_tokens, _ = _hand_logps(ours.model, batch)
    (pc, pr), (rc, rr) = policy_tokens.sum(1).chunk(2), ref_tokens.sum(1).chunk(2)
    beta = torch.tensor([0.1 * (1 + w * (1 - math.exp(-k * m))) for m in MARGINS])
    hand = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(-record.calls[-1], hand, rtol=0, atol=1e-5)
    assert hand[3] != pytest.approx(trl_losses[3].item(), abs=1e-4)  # margin 6: the per-pair beta matters
    nll = -policy_tokens[:4].sum() / mask[:4].sum()
    torch.testing.assert_close(loss.detach(), hand.mean() + gamma * nll, rtol=0, atol=1e-5)
    assert ours.beta == 0.1  # restored after the call


@pytest.mark.slow
def test_train_mmdpo_one_forward_per_step_and_cached_reference(tmp_path, tiny_qwen_dir, monkeypatch):
    from alignkit.train.mmdpo import MMDPOTrainer

    forwards, per_step, ref_batches = [0], [], []

    def count(module, args):
        if type(module).__name__ == "Qwen2VLForConditionalGeneration":
            forwards[0] += 1

    original_step, original_ref = MMDPOTrainer.training_step, MMDPOTrainer.compute_ref_log_probs

    def training_step(self, *args, **kwargs):
        before = forwards[0]
        out = original_step(self, *args, **kwargs)
        per_step.append((self.state.global_step, forwards[0] - before))
        return out

    def compute_ref_log_probs(self, *args, **kwargs):
        ref_batches.append(1)
        return original_ref(self, *args, **kwargs)

    monkeypatch.setattr(MMDPOTrainer, "training_step", training_step)
    monkeypatch.setattr(MMDPOTrainer, "compute_ref_log_probs", compute_ref_log_probs)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        pairs, run = _write_pairs(tmp_path), tmp_path / "run"
        adapter = train_mmdpo(pairs, run, TrainConfig(method="mmdpo", max_steps=2, save_steps=1, margin_key="rm_margin"), model=str(tiny_qwen_dir))
        assert ref_batches == [1, 1]  # 4 pairs, batch size 2, before training
        assert per_step == [(0, 1), (1, 1)]  # one model forward per step: no reference forward
        (cache,) = (run / "ref_logps").iterdir()
        cached = cache.read_bytes()
        assert len(cached.splitlines()) == 4

        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        for m in metrics:
            assert {"loss", "rewards/accuracies", "rewards/margins", "beta/mean", "beta/min", "beta/max"} <= m.keys()
            assert m["beta/min"] == m["beta/max"] == pytest.approx(0.1)  # negative rm_margin: β_ori
        assert (adapter / "adapter_config.json").exists()

        # extending the run resumes from checkpoint-2 and reuses the cache without a reference forward
        ref_batches.clear(), per_step.clear()
        train_mmdpo(pairs, run, TrainConfig(method="mmdpo", max_steps=3, save_steps=1, margin_key="rm_margin"), model=str(tiny_qwen_dir))
        assert ref_batches == [] and per_step == [(2, 1)]
        assert cache.read_bytes() == cached
    finally:
        hook.remove()
