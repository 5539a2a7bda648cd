"""Fingerprints are derived: every key a stage declares and every file it reads re-runs it, nothing else does.

The test walks every leaf key of a recipe that has every section, changes it to another valid
value, and checks each stage's fingerprint: changed exactly for the stages that declare the key
(and do not exclude it), unchanged for all others, upstream stages included. Then it changes the
bytes of every file any stage reads. Fingerprints are computed without running anything.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from alignkit.recipe import Recipe, load_recipe
from alignkit.resources import builtin_dir
from alignkit.runner import Runner
from alignkit.stages import STAGES

# Keys that choose where things are, not what is computed, or that name the prompts' source (the
# file itself is covered by the file-bytes test): no stage fingerprints them. A benchmark's keys
# name its files and cannot change alone (eval.benchmark needs eval.path and no eval.synthetic).
# judge.min_accuracy is the calibration gate's threshold, checked by the runner before any stage (and it
# cannot be set without judge.calibration, which ALTERNATIVES changes).
NOT_SETTINGS = {"output_dir", "stages", "data.prompts", "data.pairs", "sft.data", "eval.prompts", "eval.benchmark",
                "eval.path", "eval.images", "judge.min_accuracy"}  # fmt: skip


def _recipe_text(tmp_path: Path, method: str) -> str:
    return f"""\
output_dir: {tmp_path / "run"}
seed: 3
policy: {{model: tiny:qwen2-vl}}
data:
  synthetic: {{num_prompts: 4, seed: 2}}
levels: {{model: tiny:clip}}
sample: {{backend: transformers, template: {tmp_path / "template.yaml"}}}
judge: {{backend: reference, rubric: {tmp_path / "judge.yaml"}, model: judge-m}}
pairs: {{strategy: best_worst}}
train: {{method: {method}}}
ppo:
  rewards:
    - {{source: reference}}
    - {{source: function, path: "{tmp_path / "reward_fn.py"}:score", weight: 0.5}}
    - {{source: reward_model, weight: 0.1}}
reward_model: {{}}
sft: {{synthetic: {{num_examples: 8}}}}
eval: {{synthetic: {{num_prompts: 4, seed: 9}}}}
"""


def _inputs(tmp_path: Path) -> None:
    """The files stages read, as they would be after the earlier stages (content does not matter)."""
    (tmp_path / "template.yaml").write_text("instruction: Think, then answer.\n")
    shutil.copy(builtin_dir("judges") / "overall.yaml", tmp_path / "judge.yaml")
    (tmp_path / "reward_fn.py").write_text("def score(prompt, sample):\n    return 1.0\n")
    run = tmp_path / "run"
    (run / "reward_model" / "model").mkdir(parents=True)
    (run / "reward_model" / "model" / "head.safetensors").write_bytes(b"head")
    for name in ("prompts", "samples", "verdicts"):
        (run / f"{name}.jsonl").write_text(json.dumps({"id": name}) + "\n")
    (run / "pairs.jsonl").write_text(json.dumps({"pair_id": "a>b", "margin": 1.0}) + "\n")


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _field(path: str):
    """The pydantic field at a dotted recipe path (for Literal alternatives)."""
    model, info = Recipe, None
    for part in path.split("."):
        info = model.model_fields[part]
        model = next((a for a in [info.annotation, *typing.get_args(info.annotation)]
                      if isinstance(a, type) and hasattr(a, "model_fields")), None)  # fmt: skip
    return info


# Values for keys whose type alone does not give a valid different value.
ALTERNATIVES = {
    "policy.model": "tiny:llava", "policy.adapter": "some/adapter", "sample.template": "think",
    "sample.base_url": "http://127.0.0.1:9/v1", "sample.model_name": "served", "sample.api_key_env": "OTHER_KEY",
    "sample.vllm.dtype": "float32", "sample.vllm.gpu_memory_utilization": 0.5, "sample.vllm.enforce_eager": True,
    "judge.rubric": "hallucination", "judge.model": "judge-n", "judge.base_url": "http://127.0.0.1:9/v1",
    "judge.api_key_env": "OTHER_KEY", "train.margin_key": "rm_margin", "train.target_modules": ["q_proj"],
    "reward_model.model": "tiny:llava", "reward_model.target_modules": ["q_proj"], "ppo.rewards": [{"source": "reference"}],
    "ppo.target_kl": 6.0, "grpo.rewards": [{"source": "reference", "weight": 0.5}], "data.synthetic.tasks": ["describe"], "sft.synthetic.tasks": ["count"], "sft.phases": [{"max_steps": 2}], "eval.synthetic.tasks": ["count"],
    "sample.vllm.kv_cache_memory": 1.0, "judge.max_requests": 100, "judge.max_cost": 5.0,
    "eval.vocabulary": "coco", "train.gradient_checkpointing": True, "train.attn_implementation": "eager",
    "tracking.project": "other", "tracking.run_name": "named", "pairs.min_length_ratio": 0.5,
    "judge.vocabulary": "coco", "eval.max_questions": 3, "judge.calibration": "labels.jsonl",
    "levels.model": "some/clip",
    "ppo.vllm_server.url": "http://127.0.0.1:9", "ppo.vllm_server.gpus": "1", "ppo.vllm_server.port": 8123,
    "ppo.vllm_server.args": ["--max-num-seqs", "4"], "ppo.vllm_server.api_key_env": "OTHER_KEY",
    "grpo.vllm_server.url": "http://127.0.0.1:9", "grpo.vllm_server.gpus": "1", "grpo.vllm_server.port": 8123,
    "grpo.vllm_server.args": ["--max-num-seqs", "4"], "grpo.vllm_server.api_key_env": "OTHER_KEY",
}  # fmt: skip


def _changed(path: str, value: object, tmp_path: Path) -> object:
    if path == "reward_model.checkpoint":
        other = tmp_path / "other_rm"
        other.mkdir(exist_ok=True)
        (other / "head.safetensors").write_bytes(b"other head")
        return str(other)
    if path == "launch.config_file":  # a file the sft stage reads: it must exist
        (tmp_path / "accelerate.yaml").write_text("mixed_precision: 'no'\n")
        return str(tmp_path / "accelerate.yaml")
    if path in ALTERNATIVES:
        return ALTERNATIVES[path]
    options = typing.get_args(_field(path).annotation)
    if options and all(isinstance(o, str) for o in options):  # a Literal
        return next(o for o in options if o != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if value is None:
        return 0.5  # the optional numbers (rpm, tpm, ...)
    raise AssertionError(f"no alternative value for {path}={value!r}: add one to ALTERNATIVES")


def _declares(stage, recipe: Recipe, key: str) -> bool:
    def under(prefix: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    return any(under(p) for p in stage.config(recipe)) and not any(under(e) for e in stage.exclude)


def _fingerprints(recipe: Recipe) -> dict[str, str]:
    runner = Runner(recipe)
    return {s.name: runner.fingerprint_of(s) for s in STAGES}


@pytest.mark.parametrize("method", ["dpo", "ppo", "grpo"])
def test_every_declared_key_reruns_its_stage_and_nothing_else(tmp_path, method):
    _inputs(tmp_path)
    (tmp_path / "r.yaml").write_text(_recipe_text(tmp_path, method))
    base = load_recipe(tmp_path / "r.yaml")
    before = _fingerprints(base)
    raw = yaml.safe_load((tmp_path / "r.yaml").read_text())
    dumped = base.model_dump(mode="json")
    checked = 0
    for key, value in _leaves(dumped).items():
        if key in NOT_SETTINGS or key.endswith(".world"):  # `world` has one option (shapes)
            continue
        changed = yaml.safe_load(yaml.safe_dump(raw))
        node = changed
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = _changed(key, value, tmp_path)
        after = _fingerprints(Recipe.model_validate(changed))
        for stage in STAGES:
            rerun = after[stage.name] != before[stage.name]
            assert rerun == _declares(stage, base, key), (
                f"{key}: stage {stage.name} {'re-runs' if rerun else 'does not re-run'}"
            )
        checked += 1
    assert checked > 60  # every section's keys were walked


def test_every_file_a_stage_reads_reruns_it(tmp_path):
    _inputs(tmp_path)
    (tmp_path / "r.yaml").write_text(_recipe_text(tmp_path, "ppo"))  # eval.judge is on: eval reads the judge file
    recipe = load_recipe(tmp_path / "r.yaml")
    runner = Runner(recipe)
    reads = {s.name: {Path(p).resolve() for p in s.reads(runner.context(s))} for s in STAGES}
    files = set().union(*reads.values())
    # the run's inputs and the user's files: judge file, template, reward function, reward-model head
    assert {tmp_path / "judge.yaml", tmp_path / "template.yaml", tmp_path / "reward_fn.py"} <= files
    before = _fingerprints(recipe)
    for f in sorted(files):
        original = f.read_bytes()
        f.write_bytes(original + b"\n# edited\n")
        after = _fingerprints(recipe)
        f.write_bytes(original)
        for stage in STAGES:
            rerun = after[stage.name] != before[stage.name]
            reads_it = f in reads[stage.name] or (stage.name in ("reward_model", "score") and f.name == "pairs.jsonl")
            assert rerun == reads_it, f"{f.name}: stage {stage.name} {'re-runs' if rerun else 'does not re-run'}"


def test_editing_the_judge_file_reruns_eval_and_ppo(tmp_path):
    """Before, eval's and PPO's fingerprints held the judge's name, not its content: a stale judge score."""
    _inputs(tmp_path)
    (tmp_path / "r.yaml").write_text(_recipe_text(tmp_path, "ppo"))
    recipe = load_recipe(tmp_path / "r.yaml")
    before = _fingerprints(recipe)
    rubric = tmp_path / "judge.yaml"
    data = yaml.safe_load(rubric.read_text())
    data["user"] += "\nBe strict about colours."
    rubric.write_text(yaml.safe_dump(data, sort_keys=False))
    after = _fingerprints(recipe)
    assert after["eval"] != before["eval"] and after["train"] != before["train"] and after["judge"] != before["judge"]
    assert after["sample"] == before["sample"] and after["pairs"] == before["pairs"]


@pytest.mark.slow
def test_eval_judge_score_is_not_stale_after_a_judge_file_edit(tmp_path):
    """End to end: before, `eval` skipped as up to date after its judge file changed (a stale judge score)."""
    shutil.copy(builtin_dir("judges") / "overall.yaml", tmp_path / "judge.yaml")
    (tmp_path / "r.yaml").write_text(f"""\
output_dir: {tmp_path / "run"}
data: {{synthetic: {{num_prompts: 2}}}}
judge: {{backend: reference, rubric: {tmp_path / "judge.yaml"}}}
eval: {{synthetic: {{num_prompts: 4, seed: 9, tasks: [describe]}}, max_new_tokens: 8}}
""")
    results = tmp_path / "run" / "eval" / "base" / "results.json"
    Runner(load_recipe(tmp_path / "r.yaml")).run(["eval"])
    first = results.stat().st_mtime_ns
    Runner(load_recipe(tmp_path / "r.yaml")).run(["eval"])
    assert results.stat().st_mtime_ns == first  # unchanged inputs: skipped
    with (tmp_path / "judge.yaml").open("a") as f:
        f.write("# stricter now\n")
    Runner(load_recipe(tmp_path / "r.yaml")).run(["eval"])
    assert results.stat().st_mtime_ns != first  # the judge file changed: evaluated and judged again


@pytest.mark.slow
def test_ppo_with_a_judge_reward_reruns_after_a_judge_file_edit(tmp_path):
    """End to end: before, PPO's fingerprint held the judge's name only, so an edited judge file kept the old policy."""
    shutil.copy(builtin_dir("judges") / "overall.yaml", tmp_path / "judge.yaml")
    (tmp_path / "r.yaml").write_text(f"""\
output_dir: {tmp_path / "run"}
data: {{synthetic: {{num_prompts: 2, tasks: [describe]}}}}
sample: {{backend: transformers, num_samples: 2, max_new_tokens: 6}}
judge: {{backend: reference, rubric: {tmp_path / "judge.yaml"}}}
train: {{method: ppo}}
ppo: {{steps: 1, prompts_per_step: 2, ppo_epochs: 1, num_minibatches: 1, rewards: [{{source: reference}}]}}
""")
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    Runner(load_recipe(tmp_path / "r.yaml")).run(["prompts", "train"])
    first = metrics.stat().st_mtime_ns
    Runner(load_recipe(tmp_path / "r.yaml")).run(["prompts", "train"])
    assert metrics.stat().st_mtime_ns == first
    with (tmp_path / "judge.yaml").open("a") as f:
        f.write("# stricter now\n")
    Runner(load_recipe(tmp_path / "r.yaml")).run(["prompts", "train"])
    assert metrics.stat().st_mtime_ns != first  # the reward's judge file changed: trained again
