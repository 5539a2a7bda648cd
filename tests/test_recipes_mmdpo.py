"""End to end: recipes/shapes-mmdpo-rm.yaml (MM-DPO with the critique reward model) through `alignkit`.

Small overrides keep it to seconds per run on a CPU: 8 prompts, 4 samples each, a 5-step reward
model with short critiques, one epoch of MM-DPO over the pairs. Then: a re-run skips every stage;
a new beta scaling with `finetune: full` retrains without recomputing the cached reference log-probs
and writes train/model, which the runner reports as the trained policy.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.train.mmdpo import dynamic_beta

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "shapes-mmdpo-rm.yaml")
STAGES = ["prompts", "sample", "judge", "pairs", "reward_model", "score", "train"]
SMALL = ["data.synthetic.num_prompts=8", "sample.num_samples=4", "reward_model.max_steps=5",
         "reward_model.max_critique_tokens=8"]  # fmt: skip


def alignkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # wide enough that rich prints paths on one line
    res = subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_betas(metrics: list[dict], margins: list[float], w: float) -> None:
    """Every pair is trained once (one epoch): the logged extremes are those of the pairs' betas."""
    betas = [dynamic_beta(m, 0.1, w, 0.5) for m in margins]
    assert len(metrics) == math.ceil(len(margins) / 2)  # batch size 2
    assert max(m["beta/max"] for m in metrics) == pytest.approx(max(betas), rel=1e-5)
    assert min(m["beta/min"] for m in metrics) == pytest.approx(min(betas), rel=1e-5)
    assert all(m["beta/min"] <= m["beta/mean"] <= m["beta/max"] for m in metrics)
    assert any(m["beta/max"] > m["beta/min"] for m in metrics) or any(m["beta/mean"] > 0.1 for m in metrics)


@pytest.mark.slow
def test_mmdpo_rm_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    args = ["run", RECIPE, f"output_dir={out}", *SMALL]
    first = alignkit(*args, cwd=tmp_path)

    state = json.loads((out / "stages.json").read_text())
    assert [s for s in STAGES if state.get(s, {}).get("status") == "done"] == STAGES
    assert "reward model on held-out pairs: ACC" in first.stdout
    assert "reward model vs judge on" in first.stdout

    # the score stage wrote rm_scores.jsonl and the reward model's margin into every pair
    scores = {s["sample_id"]: s["rm_score"] for s in _jsonl(out / "rm_scores.jsonl")}
    pairs = _jsonl(out / "pairs.jsonl")
    assert pairs
    for p in pairs:
        assert p["rm_chosen_score"] == scores[p["chosen_id"]] and p["rm_rejected_score"] == scores[p["rejected_id"]]
        assert p["rm_margin"] == pytest.approx(p["rm_chosen_score"] - p["rm_rejected_score"])
    margins = [p["rm_margin"] for p in pairs]
    assert max(margins) > 0  # so the per-pair beta rises above β_ori somewhere

    # MM-DPO logged the per-pair beta of the reward model's margins, and wrote the adapter
    _check_betas(_jsonl(out / "train" / "metrics.jsonl"), margins, w=0.5)
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    assert "adapter (PEFT)" in first.stdout and str(out / "train" / "adapter") in first.stdout
    (cache,) = (out / "ref_logps").glob("*.jsonl")  # outside train/
    assert len(cache.read_text().splitlines()) == len(pairs)
    cache_stat = cache.stat().st_mtime_ns, cache.read_bytes()

    # a re-run skips every stage and changes nothing
    pairs_bytes = (out / "pairs.jsonl").read_bytes()
    again = alignkit(*args, cwd=tmp_path)
    assert again.stdout.count("up to date, skipped") == len(STAGES), again.stdout
    assert json.loads((out / "stages.json").read_text()) == state
    assert (out / "pairs.jsonl").read_bytes() == pairs_bytes

    # a new beta scaling, fully fine-tuned: train/ is cleared and retrained into train/model (the trained
    # policy now), with the reference log-probs read from the cache (same reference model)
    full = ["train.w=1.0", "train.finetune=full"]
    res = alignkit(*args, *full, cwd=tmp_path)
    assert res.stdout.count("up to date, skipped") == len(STAGES) - 1, res.stdout
    assert "train: up to date" not in res.stdout
    _check_betas(_jsonl(out / "train" / "metrics.jsonl"), margins, w=1.0)
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == cache_stat
    assert (out / "train" / "model" / "config.json").is_file() and not (out / "train" / "adapter").exists()
    assert "model (full fine-tuning)" in res.stdout and "adapter (PEFT)" not in res.stdout

    from alignkit.recipe import load_recipe
    from alignkit.runner import Runner

    runner = Runner(load_recipe(RECIPE, [f"output_dir={out}", *SMALL, *full]))
    assert runner.trained(1) == (str(out / "train" / "model"), None)
    runner = Runner(load_recipe(RECIPE, [f"output_dir={out}", *SMALL]))
    assert runner.trained(1) is None  # the LoRA run's adapter was replaced by the full run
