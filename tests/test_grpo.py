"""GRPO and RLOO (TRL's trainers with alignkit's rewards): advantages against hand computation, failed
verdicts left out of their group, the judge reward over HTTP, and short runs on the tiny Qwen2-VL."""

import base64
import io
import json
import statistics

import pytest
from PIL import Image

from alignkit.judge.config import JudgeConfig
from alignkit.records import Prompt, Sample, load_image
from alignkit.sample.config import SampleConfig
from alignkit.sample.templates import load_template
from alignkit.train.config import GrpoConfig, TrainConfig
from alignkit.train.grpo import GroupReward, grpo_trainer, train_grpo
from alignkit.train.rewards import RewardFn, judge_reward


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from alignkit.worlds.shapes import make_shapes_prompts

    return make_shapes_prompts(tmp_path_factory.mktemp("grpo"), 8, seed=0)


def _scripted(values: list[float | None]) -> RewardFn:
    """A reward giving the i-th answer of a step `values[i]` (None: a failed verdict)."""
    return RewardFn("scripted", lambda ps, ss: values[: len(ss)])


def _settings(method: str, **overrides):
    """The grpo, sample and train sections of a short run; `overrides` go to whichever has the key."""
    settings = dict(prompts_per_step=2, num_samples=4, max_new_tokens=8, learning_rate=1e-3) | overrides
    sections = {}
    for cls in (GrpoConfig, SampleConfig, TrainConfig):
        sections[cls] = {k: settings.pop(k) for k in list(settings) if k in cls.model_fields}
    assert not settings, f"not a grpo, sample or train key: {settings}"
    return (GrpoConfig(**sections[GrpoConfig]), SampleConfig(template="plain", **sections[SampleConfig]),
            TrainConfig(method=method, **sections[TrainConfig]))  # fmt: skip


# Two groups of K = 4: the first has a failed verdict (None), the second none.
REWARDS = [1.0, None, 3.0, 5.0, 0.0, 0.0, 4.0, 2.0]


def _grpo_by_hand(group: list[float | None]) -> list[float]:
    """(r − mean) / (std + 1e-4) over the group's scored answers (sample std, as TRL); 0 for a failed one."""
    scored = [r for r in group if r is not None]
    mean, std = statistics.fmean(scored), statistics.stdev(scored)
    return [0.0 if r is None else (r - mean) / (std + 1e-4) for r in group]


def _rloo_by_hand(group: list[float | None]) -> list[float]:
    """r − the mean of the group's *other* scored answers; 0 for a failed one."""
    scored = [r for r in group if r is not None]
    return [0.0 if r is None else r - (sum(scored) - r) / (len(scored) - 1) for r in group]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_advantages_by_hand_with_a_failed_verdict_left_out(method, tiny_qwen_dir, shapes, tmp_path):
    cfg, sample, train = _settings(method)
    trainer, _ = grpo_trainer(shapes[:2], tmp_path, cfg, model=str(tiny_qwen_dir), reward=_scripted(REWARDS),
                              sample=sample, train=train)  # fmt: skip
    trainer.model.train()
    batch = [trainer.train_dataset[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]  # K copies of each prompt, as TRL's sampler
    out = trainer._generate_and_score_completions(batch)
    assert "pixel_values" in out and "image_grid_thw" in out  # the policy saw each prompt's image

    by_hand = _grpo_by_hand if method == "grpo" else _rloo_by_hand
    expected = by_hand(REWARDS[:4]) + by_hand(REWARDS[4:])
    assert out["advantages"].tolist() == pytest.approx(expected, abs=1e-5)
    # by hand: GRPO's first group is {1, 3, 5}: mean 3, std 2; RLOO's baselines are (3+5)/2, (1+5)/2, (1+3)/2
    first = [-2 / 2.0001, 0.0, 0.0, 2 / 2.0001] if method == "grpo" else [-3.0, 0.0, 0.0, 3.0]
    assert out["advantages"][:4].tolist() == pytest.approx(first, abs=1e-5)
    # scoring the failed answer 0 instead would have moved the others' baseline
    as_zero = by_hand([0.0 if r is None else r for r in REWARDS[:4]])
    assert as_zero[0] != pytest.approx(expected[0], abs=1e-3)


def _trl_completions(texts: list[str]) -> list[list[dict]]:
    return [[{"role": "assistant", "content": t}] for t in texts]


JUDGE_KEY_ENV = "ALIGNKIT_TEST_JUDGE_KEY"


def _judge_reply(body: dict) -> dict:
    """Grades that are a function of the answer's length, so each answer has its own score."""
    from alignkit.testing.chat_server import RecordedRequest

    answer = RecordedRequest("POST", "", {}, body).text().rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    return {"rationale": "test verdict", "hallucination": len(answer) % 11, "correctness": len(answer.split()) % 11}


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_the_transformers_rollout_never_samples_an_image_placeholder(method, tiny_qwen_dir, shapes, tmp_path):
    """With the placeholders' logits raised far above every text token's, the rollout (TRL's generation
    call) samples none of them; with TRL's own suppression (`image_token_id` alone) it samples the video pad."""
    from alignkit.models.inputs import placeholder_ids

    cfg, sample, train = _settings(method, num_samples=2, max_new_tokens=4)
    trainer, _ = grpo_trainer(shapes[:1], tmp_path, cfg, model=str(tiny_qwen_dir), reward=_scripted([0.0] * 2),
                              sample=sample, train=train)  # fmt: skip
    pads = sorted(placeholder_ids(trainer.model.config))
    image, video = trainer.model.config.image_token_id, trainer.model.config.video_token_id
    assert pads == sorted({image, video})
    assert trainer.generation_config.suppress_tokens == pads

    def biased(module, args, logits):  # the placeholders are the argmax by far, at every position
        logits[..., pads] += 1e4
        return logits

    trainer.model.get_output_embeddings().register_forward_hook(biased)
    trainer.model.train()
    batch = [trainer.train_dataset[0]] * 2

    def sampled() -> set[int]:
        out = trainer._generate_and_score_completions(batch)
        return set(out["completion_ids"][out["completion_mask"].bool()].tolist())

    assert not sampled() & set(pads)
    trainer.generation_config.suppress_tokens = trainer.generation_kwargs["suppress_tokens"] = [image]  # TRL's default
    assert video in sampled()


def test_judge_reward_sends_images_caches_and_leaves_a_failed_verdict_out(shapes, tmp_path, monkeypatch):
    from alignkit.testing.chat_server import ChatServer

    monkeypatch.setenv(JUDGE_KEY_ENV, "test")
    texts = ["A red square.", "Two blue circles.", "Nothing at all here.", "A green triangle."]
    ids = [shapes[0].prompt_id] * 2 + [shapes[1].prompt_id] * 2
    logged = {}
    with ChatServer(_judge_reply) as server:
        judge = judge_reward(JudgeConfig(rubric="overall", backend="openai", model=server.model, base_url=server.url,
                                         api_key_env=JUDGE_KEY_ENV, concurrency=4, timeout=30.0, max_retries=1),
                             tmp_path / "cache.sqlite")  # fmt: skip
        reward = GroupReward(judge, shapes, load_template("plain"), max_new_tokens=32)
        server.inject("bad_request", when="Nothing at all here.")  # this answer's verdict fails
        scores = reward(prompts=None, completions=_trl_completions(texts), completion_ids=[[0] * 4] * 4,
                        prompt_id=ids, log_metric=logged.__setitem__)  # fmt: skip

        # one request per answer, each carrying its prompt's image (the same pixels) and question
        assert len(server.chat_requests) == 4
        for request in server.chat_requests:
            answer = request.text().rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()
            prompt = next(p for p in shapes if p.prompt_id == ids[texts.index(answer)])
            (url,) = request.image_urls()
            sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
            assert sent.tobytes() == load_image(prompt.images[0]).convert("RGB").tobytes()
            assert prompt.question in request.text()
        # the `overall` score, 0.6·(1 − hallucination/10) + 0.4·correctness/10, by hand for "A red square."
        assert scores[0] == pytest.approx(0.6 * (1 - 2 / 10) + 0.4 * 3 / 10)
        assert scores[2] is None and None not in scores[:2] + scores[3:]  # failed: left out, not scored 0
        assert logged == {"reward/failures": 1}

        # the same answers again (a repeat in a later group, or a resumed run): scored answers come from the
        # cache; only the failed one is asked again
        again = reward(prompts=None, completions=_trl_completions(texts), completion_ids=[[0] * 4] * 4,
                       prompt_id=ids, log_metric=logged.__setitem__)  # fmt: skip
        assert len(server.chat_requests) == 5 and "Nothing at all here." in server.chat_requests[-1].text()
        assert again[:2] + again[3:] == scores[:2] + scores[3:] and again[2] is not None
        assert logged == {"reward/failures": 0}


def _judge_score(text: str) -> float:
    """The `overall` score of `_judge_reply`'s grades of `text` as the judge saw it (tags defused)."""
    from alignkit.judge.rubric import neutralise

    answer = neutralise(text).strip()
    return 0.6 * (1 - (len(answer) % 11) / 10) + 0.4 * (len(answer.split()) % 11) / 10


@pytest.mark.slow
def test_a_grpo_step_scores_its_groups_with_the_openai_judge(tiny_qwen_dir, shapes, tmp_path, monkeypatch):
    from alignkit.testing.chat_server import ChatServer

    monkeypatch.setenv(JUDGE_KEY_ENV, "test")
    scored = []
    with ChatServer(_judge_reply) as server:
        judge = judge_reward(JudgeConfig(rubric="overall", backend="openai", model=server.model, base_url=server.url,
                                         api_key_env=JUDGE_KEY_ENV, concurrency=4, timeout=30.0, max_retries=1),
                             tmp_path / "cache.sqlite")  # fmt: skip

        def recorded(prompts, samples):
            scored.append(samples)
            return judge.scores(prompts, samples)

        cfg, sample, train = _settings("grpo", steps=1, num_samples=3)
        train_grpo(shapes[:2], tmp_path / "run", cfg, model=str(tiny_qwen_dir), reward=RewardFn(judge.name, recorded),
                   sample=sample, train=train)  # fmt: skip
        ((samples,),) = [scored]
        texts = [s.text for s in samples]
        assert len(samples) == 6 and sorted({s.prompt_id for s in samples}) == sorted(p.prompt_id for p in shapes[:2])
        (step,) = _metrics(tmp_path / "run")
        assert step["reward"] == pytest.approx(statistics.fmean(map(_judge_score, texts)), abs=1e-5)
        assert step["reward/failures"] == 0
        # one request per answer (six different texts), each with its prompt's image
        assert len(set(texts)) == 6 and len(server.chat_requests) == 6
        assert all(len(r.image_urls()) == 1 for r in server.chat_requests)
        prompts = [next(p for p in shapes if p.prompt_id == s.prompt_id) for s in samples]
        assert judge(prompts, samples) == pytest.approx([_judge_score(t) for t in texts])
        assert len(server.chat_requests) == 6  # the same answers again: from the cache


def _says_red(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
    """+1 when the answer says "red": a word the random-weight policy samples about 1 time in 10."""
    return [float("red" in s.text) for s in samples]


def _length(prompts: list[Prompt], samples: list[Sample]) -> list[float]:
    return [float(len(s.text)) for s in samples]


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_fixed_seed_run_raises_the_reward(method, tiny_qwen_dir, shapes, tmp_path):
    # full fine-tuning: the tiny policy learns a word in a few steps (with LoRA, tens of steps)
    cfg, sample, train = _settings(method, steps=20, prompts_per_step=4, max_new_tokens=16, learning_rate=1e-3,
                                   finetune="full", save_steps=100)  # fmt: skip
    model = train_grpo(shapes, tmp_path, cfg, model=str(tiny_qwen_dir), reward=RewardFn("red", _says_red),
                       sample=sample, train=train)  # fmt: skip
    steps = _metrics(tmp_path)
    first, last = [s["reward"] for s in steps[:4]], [s["reward"] for s in steps[-4:]]
    assert statistics.fmean(last) > statistics.fmean(first) + 0.3, (first, last)
    assert [s["step"] for s in steps] == list(range(1, 21))
    assert {"loss", "reward", "reward_std", "kl", "entropy", "reward/failures"} <= steps[-1].keys()
    assert model == tmp_path / "model" and (model / "config.json").is_file() and (model / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_a_rerun_resumes_from_the_last_checkpoint(tiny_qwen_dir, shapes, tmp_path):
    calls = []

    def counted(prompts, samples):
        calls.append(len(samples))
        return _length(prompts, samples)

    reward = RewardFn("words", counted)
    cfg, sample, train = _settings("grpo", steps=2, save_steps=1)
    train_grpo(shapes, tmp_path, cfg, model=str(tiny_qwen_dir), reward=reward, sample=sample, train=train)
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    before = _metrics(tmp_path)
    calls.clear()
    cfg, sample, train = _settings("grpo", steps=3, save_steps=1)  # more steps extend the finished run
    train_grpo(shapes, tmp_path, cfg, model=str(tiny_qwen_dir), reward=reward, sample=sample, train=train)
    assert calls == [8]  # one step sampled and scored: steps 1 and 2 were not redone
    after = _metrics(tmp_path)
    assert [s["step"] for s in after] == [1, 2, 3] and after[:2] == before


def test_vllm_generation_is_a_clear_error(tiny_qwen_dir, shapes, tmp_path):
    from alignkit.errors import RecipeError

    cfg, sample, train = _settings("grpo", rollout="vllm")
    with pytest.raises(RecipeError, match="grpo.rollout: vllm .* not supported yet"):
        grpo_trainer(shapes, tmp_path, cfg, model=str(tiny_qwen_dir), reward=None, sample=sample, train=train)
    cfg, sample, train = _settings("rloo", num_samples=1)
    with pytest.raises(RecipeError, match="sample.num_samples=1: rloo .* at least 2"):
        grpo_trainer(shapes, tmp_path, cfg, model=str(tiny_qwen_dir), reward=None, sample=sample, train=train)


@pytest.mark.slow
def test_cli_run_killed_mid_grpo_resumes_and_eval_finds_the_adapter(tiny_qwen_dir, tmp_path):
    import os
    import signal

    from tests.test_launch import alignkit_run, mark_lines_before, run_until_checkpoint

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / "run"}
stages: [prompts, train, eval]
policy: {{model: {tiny_qwen_dir}}}
data: {{synthetic: {{world: shapes, num_prompts: 4, seed: 2}}}}
sample: {{num_samples: 2, max_new_tokens: 8, template: plain}}
judge: {{backend: reference, rubric: overall}}
train: {{method: grpo, learning_rate: 1.0e-3, save_steps: 1}}
grpo: {{steps: 6, prompts_per_step: 2, rewards: [{{source: reference, weight: 1.0}}]}}
eval: {{synthetic: {{world: shapes, num_prompts: 4, seed: 99}}, max_new_tokens: 8}}
""")
    train = tmp_path / "run" / "train"
    proc = run_until_checkpoint(recipe, train / "checkpoints")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (train / "adapter").exists()  # killed in the middle of training
    mark_lines_before(train / "metrics.jsonl")

    done = alignkit_run(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _metrics(train)
    resumed_from = max(s["step"] for s in steps if s.get("before"))
    assert 1 <= resumed_from < 6  # the steps up to the checkpoint were kept, not redone
    assert [(s["step"], s.get("before", False)) for s in steps] == [(i, i <= resumed_from) for i in range(1, 7)]
    assert all("reward" in s for s in steps) and (train / "adapter" / "adapter_config.json").is_file()
    run = tmp_path / "run"
    assert (run / "eval" / "comparison.txt").is_file()
    evaluated = json.loads((run / "eval" / "round-1" / "results.json").read_text())["policy"]
    assert evaluated == f"{tiny_qwen_dir}+{train / 'adapter'}"  # eval sampled from the GRPO adapter


def test_bad_grpo_reward_specs_name_the_grpo_key(tmp_path):
    from alignkit.errors import RecipeError
    from alignkit.recipe import Recipe
    from alignkit.train.rewards import function_reward

    with pytest.raises(ValueError, match="grpo.rewards.0"):
        Recipe.model_validate({"train": {"method": "grpo"}, "grpo": {"rewards": [{"source": "function", "path": "x"}]}})
    with pytest.raises(RecipeError, match="grpo.rewards: .*no module named 'alignkit_no_such_module'"):
        function_reward("alignkit_no_such_module:score", "grpo.rewards")


@pytest.mark.slow
def test_two_processes_score_on_the_main_one_and_each_trains_on_its_own_scores(tiny_qwen_dir, tmp_path, monkeypatch):
    from tests.test_launch import alignkit_run

    # the reward function appends every batch it scores: only the main process calls it, for the whole step
    (tmp_path / "chars.py").write_text(
        "import json, os\n"
        "def chars(prompt, sample):\n"
        "    with open(os.environ['GRPO_TEST_SCORED'], 'a') as f:\n"
        "        f.write(json.dumps([os.environ.get('RANK', '0'), sample.prompt_id, len(sample.text)]) + '\\n')\n"
        "    return float(len(sample.text))\n"
    )  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
output_dir: {tmp_path / "run"}
stages: [prompts, train]
policy: {{model: {tiny_qwen_dir}}}
data: {{synthetic: {{world: shapes, num_prompts: 4, seed: 2}}}}
sample: {{num_samples: 2, max_new_tokens: 8, template: plain}}
train: {{method: grpo, learning_rate: 1.0e-3}}
grpo: {{steps: 2, prompts_per_step: 1, rewards: [{{source: function, path: "{tmp_path / "chars.py"}:chars"}}]}}
launch: {{num_processes: 2}}
""")
    monkeypatch.setenv("GRPO_TEST_SCORED", str(tmp_path / "scored.jsonl"))
    done = alignkit_run(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 2 * 4 and {rank for rank, _, _ in scored} == {"0"}  # 2 steps x 2 prompts x K=2, rank 0
    steps = _metrics(tmp_path / "run" / "train")
    # TRL gathers each process's returned slice: the step's mean is over all four answers only when
    # each process got the scores of its own answers back
    for step, batch in zip(steps, (scored[:4], scored[4:])):
        assert step["reward"] == pytest.approx(statistics.fmean(n for _, _, n in batch))
        assert len({pid for _, pid, _ in batch}) == 2  # one prompt from each process
