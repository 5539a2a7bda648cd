"""Critique reward model: losses against hand computations, ACC/ACC+, training, save/load, stages."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignkit.judge.reference import judge_reference
from alignkit.judge.rubric import load_rubric
from alignkit.models.inputs import collate
from alignkit.objects import COLORS, SHAPES
from alignkit.pairs import build_pairs
from alignkit.records import RecordError, Sample, write_jsonl
from alignkit.reward.config import RewardModelConfig
from alignkit.reward.data import pair_features, read_rm_pairs
from alignkit.reward.losses import LossWeights, reward_loss
from alignkit.reward.model import build_reward_model, load_reward_model
from alignkit.reward.score import add_rm_columns, evaluate_pairs, pair_answers, pairwise_accuracy, score_answers
from alignkit.reward.train import fit
from alignkit.worlds.shapes import describe_objects, make_shapes_prompts


def shapes_pairs(out_dir: Path, num_prompts: int, seed: int) -> Path:
    """Describe prompts: chosen = the gold description, rejected = it plus one absent object.

    Verdicts (and so the critiques) come from the reference judge, as in an RLAIF run.
    """
    prompts = make_shapes_prompts(out_dir, num_prompts, seed=seed, tasks=("describe",))
    rubric = load_rubric("overall")
    samples, verdicts = [], []
    for p in prompts:
        absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in p.objects]
        hallucinated = p.objects + [random.Random(p.prompt_id).choice(absent)]
        for i, objects in enumerate([p.objects, hallucinated]):
            text = describe_objects(objects)
            s = Sample(f"{p.prompt_id}#s{i}", p.prompt_id, text, "", text, True, len(text.split()), "stop")
            samples.append(s)
            verdicts.append(judge_reference(rubric, p, s))
    write_jsonl(out_dir / "prompts.jsonl", prompts)
    write_jsonl(out_dir / "samples.jsonl", samples)
    write_jsonl(out_dir / "verdicts.jsonl", verdicts)
    pairs, _ = build_pairs(prompts, samples, verdicts, {p.prompt_id: p.question for p in prompts})
    return write_jsonl(out_dir / "pairs.jsonl", pairs)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return shapes_pairs(tmp_path_factory.mktemp("rm-pairs"), 40, seed=0).parent


# ---------------------------------------------------------------------------------------------
# data


def test_rationales_become_critiques(pairs_dir):
    pairs = read_rm_pairs(pairs_dir / "pairs.jsonl")
    assert len(pairs) == 40
    assert "not in the image" in pairs[0].rejected_critique
    assert pairs[0].chosen_critique.startswith("Hallucination: all")


def test_bad_margin_names_file_and_line(tmp_path, pairs_dir):
    lines = (pairs_dir / "pairs.jsonl").read_text().splitlines()
    bad = json.loads(lines[1]) | {"margin": "big"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: 'margin' must be a number"):
        read_rm_pairs(path)


# ---------------------------------------------------------------------------------------------
# metrics


def test_acc_and_acc_plus_match_a_hand_count():
    prompt_ids = ["a", "a", "b", "c", "c", "c"]
    chosen = [1.0, 0.5, 2.0, 0.0, 1.0, 3.0]
    rejected = [0.0, 0.7, 1.0, -1.0, 1.0, 2.0]  # wrong: a's 2nd, c's 2nd (a tie counts as wrong)
    result = pairwise_accuracy(prompt_ids, chosen, rejected)
    assert result == {"acc": 4 / 6, "acc_plus": 1 / 3, "num_pairs": 6, "num_prompts": 3}


def test_rm_columns_are_chosen_minus_rejected():
    pairs = [{"pair_id": "q#s0>q#s1", "chosen_id": "q#s0", "rejected_id": "q#s1"}]
    out = add_rm_columns(pairs, {"q#s0": 0.75, "q#s1": -0.5}, "pairs.jsonl")
    assert out[0]["rm_chosen_score"] == 0.75 and out[0]["rm_rejected_score"] == -0.5 and out[0]["rm_margin"] == 1.25
    with pytest.raises(RecordError, match=r"pairs.jsonl: pair 'q#s0>q#s1': no reward-model score for sample\(s\) \['q#s1'\]"):
        add_rm_columns(pairs, {"q#s0": 0.75}, "pairs.jsonl")


# ---------------------------------------------------------------------------------------------
# losses on a tiny model, against hand computations


def test_losses_match_hand_computation(tiny_qwen_dir, pairs_dir):
    torch.manual_seed(0)
    rm = build_reward_model(str(tiny_qwen_dir), "full")
    pairs = read_rm_pairs(pairs_dir / "pairs.jsonl")[:3]
    pairs[1].chosen_critique = pairs[1].rejected_critique = None  # trains the score only
    pairs[2].margin = 0.0  # a tie
    feats = [pair_features(rm.processor, p, use_critiques=True) for p in pairs]
    batch = collate([c for c, _ in feats] + [r for _, r in feats], rm.processor.tokenizer.pad_token_id, side="left")
    weights = LossWeights(critique=0.5, margin=0.3, tie=2.0, center=0.01)
    margins = torch.tensor([p.margin for p in pairs])
    with torch.no_grad():
        out = rm(**batch)
        total, parts = reward_loss(out.rewards[:3], out.rewards[3:], margins, out.critique_logits, out.critique_targets, weights)
        # rewards: the head on the final hidden state of each row's last token (left padding: the last column)
        labels = batch.pop("labels")
        hidden = rm.lm.model(**batch).last_hidden_state[:, -1]
        assert torch.allclose(out.rewards, hidden @ rm.head.weight[0] + rm.head.bias[0], atol=1e-5)
        # critique CE: transformers' own causal-LM loss, and F.cross_entropy over the shifted tokens
        full = rm.lm(**batch, labels=labels)
        keep = labels[:, 1:] != -100
        by_hand = torch.nn.functional.cross_entropy(full.logits[:, :-1][keep], labels[:, 1:][keep])
    assert keep[0].sum() > 0 and keep[1].sum() == 0 and keep[4].sum() == 0  # pair 1 has no critique tokens
    assert parts["critique_ce"] == pytest.approx(full.loss.item(), rel=1e-5)
    assert parts["critique_ce"] == pytest.approx(by_hand.item(), rel=1e-5)
    r = out.rewards.tolist()
    rc, rr = r[:3], r[3:]
    bt = [-math.log(1 / (1 + math.exp(-(rc[i] - rr[i] - 0.3 * pairs[i].margin)))) for i in (0, 1)]
    assert parts["bradley_terry"] == pytest.approx(sum(bt) / 2, rel=1e-5)
    assert parts["tie"] == pytest.approx((rc[2] - rr[2]) ** 2, rel=1e-5)
    assert parts["center"] == pytest.approx(sum((c + x) ** 2 for c, x in zip(rc, rr)) / 3, rel=1e-5)
    expected = 0.5 * parts["critique_ce"] + parts["bradley_terry"] + 2.0 * parts["tie"] + 0.01 * parts["center"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# training (slow)


@pytest.mark.slow
def test_training_ranks_held_out_pairs(tiny_qwen_dir, pairs_dir, tmp_path):
    """Half the training pairs carry the judge's critiques, half train the score only."""
    torch.manual_seed(0)
    rm = build_reward_model(str(tiny_qwen_dir), "full")
    train = read_rm_pairs(pairs_dir / "pairs.jsonl")
    for p in train[1::2]:
        p.chosen_critique = p.rejected_critique = None
    held_out = read_rm_pairs(shapes_pairs(tmp_path, 24, seed=1))
    history = fit(rm, train, steps=30, batch_size=4, learning_rate=1e-3, seed=0, encoded_dir=tmp_path / "enc")
    after = evaluate_pairs(rm, held_out, num_critiques=0)
    assert history[-1]["critique_ce"] < history[0]["critique_ce"]
    assert after["acc"] >= 0.75, after
    assert after["acc_plus"] == after["acc"]  # one pair per prompt


@pytest.mark.slow
def test_save_load_round_trip_gives_the_same_scores(tiny_qwen_dir, pairs_dir, tmp_path):
    torch.manual_seed(0)
    rm = build_reward_model(str(tiny_qwen_dir), "lora")
    pairs = read_rm_pairs(pairs_dir / "pairs.jsonl")[:4]
    fit(rm, pairs, steps=2, batch_size=2, learning_rate=1e-2, encoded_dir=tmp_path / "enc")
    answers = pair_answers(pairs[:2])
    options = {"num_critiques": 1, "max_new_tokens": 8}
    before = score_answers(rm, answers, **options)
    loaded = load_reward_model(rm.save(tmp_path / "rm"))
    after = score_answers(loaded, answers, **options)
    assert (tmp_path / "rm" / "adapter" / "adapter_config.json").is_file() and (tmp_path / "rm" / "head.safetensors").is_file()
    assert [s.critiques for s in after] == [s.critiques for s in before]
    assert [s.score for s in after] == pytest.approx([s.score for s in before], abs=1e-5)
    two = score_answers(loaded, answers, num_critiques=2, max_new_tokens=4, seed=3)
    assert all(len(s.critiques) == 2 for s in two)


@pytest.mark.slow
def test_training_resumes_after_a_kill(tiny_qwen_dir, pairs_dir, tmp_path, monkeypatch):
    from alignkit.reward import train as rm_train

    cfg = RewardModelConfig(finetune="full", max_steps=4, batch_size=2, learning_rate=1e-3, eval_fraction=0, save_steps=2)
    args = dict(model=str(tiny_qwen_dir))
    rm_train.train_reward_model(pairs_dir / "pairs.jsonl", tmp_path / "straight", cfg, **args)
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]

    calls, real = {"n": 0}, rm_train.reward_loss

    def killed_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rm_train, "reward_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        rm_train.train_reward_model(pairs_dir / "pairs.jsonl", tmp_path / "cut", cfg, **args)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    monkeypatch.setattr(rm_train, "reward_loss", real)
    summary = rm_train.train_reward_model(pairs_dir / "pairs.jsonl", tmp_path / "cut", cfg, **args)
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4] and summary["final"]["step"] == 4
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert not (tmp_path / "cut" / "checkpoints").exists()


@pytest.mark.slow
def test_train_rm_and_score_stages(tiny_qwen_dir, tmp_path):
    """`reward_model` then `score` in a run directory: rm_* columns on the pairs; a re-run skips both."""
    from alignkit.recipe import load_recipe
    from alignkit.runner import Runner

    run_dir = tmp_path / "run"
    shapes_pairs(run_dir, 6, seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {run_dir}\ndata: {{synthetic: {{num_prompts: 6}}}}\nsample: {{template: plain}}\n"
        f"reward_model: {{model: {tiny_qwen_dir}, finetune: full, max_steps: 2, batch_size: 2, "
        "eval_fraction: 0.34, max_critique_tokens: 4}\n"
    )
    summaries = Runner(load_recipe(recipe)).run(["reward_model", "score"])
    assert summaries["reward_model"]["held_out"]["num_prompts"] == 3
    assert summaries["score"]["num_scored"] == 12
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert all(p["rm_margin"] == pytest.approx(p["rm_chosen_score"] - p["rm_rejected_score"]) for p in pairs)
    state = json.loads((run_dir / "stages.json").read_text())
    Runner(load_recipe(recipe)).run(["reward_model", "score"])
    assert json.loads((run_dir / "stages.json").read_text())["reward_model"] == state["reward_model"]
