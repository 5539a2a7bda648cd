"""Online rewards for RL (PPO, GRPO, RLOO): one score per sampled answer, from the same scorers the RLAIF loop uses.

A reward function takes aligned lists of prompts and samples and returns one float per sample,
so a scorer can batch (the critique reward model) or run concurrently (the LLM judge). Sources:

- `judge`: the recipe's judge (`reference` or an OpenAI-compatible LLM judge), through
  `alignkit.judge`'s own client: concurrency limit, rate caps, retries and the sqlite verdict
  cache, so an answer sampled twice (or a resumed run) is never paid for twice;
- `reward_model`: the critique reward model's score (`alignkit.reward`);
- `function`: a Python function named "module:function" (or "path/to/file.py:function"),
  called as `function(prompt, sample) -> float`.

`combine` sums several with weights. A verdict that failed (the judge gave no valid answer after
its retries) is counted in `failures`, so training goes on and the log shows it; PPO scores it 0
(`RewardFn.__call__`), GRPO and RLOO leave it out of its group (`RewardFn.scores` gives None).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from alignkit.errors import RecipeError
from alignkit.judge.config import JudgeConfig
from alignkit.records import Prompt, Sample


class RewardFn:
    """A named batch scorer: `fn(prompts, samples) -> scores`; `failures` counts unscored samples."""

    def __init__(self, name: str, fn: Callable[[Sequence[Prompt], Sequence[Sample]], list[float | None]]):
        self.name, self.fn, self.failures = name, fn, 0

    def scores(self, prompts: Sequence[Prompt], samples: Sequence[Sample]) -> list[float | None]:
        """The scores, None where scoring failed (GRPO and RLOO leave those answers out of their group)."""
        # A NaN or infinite score is a failure like a missing one: counted, never a number to learn from.
        scores = [None if s is None or not math.isfinite(float(s)) else float(s) for s in self.fn(prompts, samples)]
        self.failures += sum(s is None for s in scores)
        return scores

    def __call__(self, prompts: Sequence[Prompt], samples: Sequence[Sample]) -> list[float]:
        """The scores with a failed one as 0 (PPO's rule)."""
        return [0.0 if s is None else s for s in self.scores(prompts, samples)]


def judge_reward(cfg: JudgeConfig, cache_path: Path) -> RewardFn:
    """The combined score (0..1) of the judge `cfg` describes, its verdicts cached in `cache_path`."""
    from alignkit.judge import load_rubric, make_judge
    from alignkit.judge.cache import VerdictCache
    from alignkit.judge.openai_judge import judge_samples
    from alignkit.judge.progress import Tally
    from alignkit.judge.reference import judge_reference
    from alignkit.objects import load_vocabulary

    rub = load_rubric(cfg.rubric)
    num_judgments = cfg.num_judgments
    judge = make_judge(rub, cfg)
    if judge is None:
        vocab = load_vocabulary(cfg.vocabulary)
        return RewardFn(f"reference/{rub.name}", lambda ps, ss: [judge_reference(rub, p, s, vocab).score for p, s in zip(ps, ss)])
    cache = VerdictCache(cache_path)

    def score(prompts: Sequence[Prompt], samples: Sequence[Sample]) -> list[float | None]:
        # Verdicts come back by sample id, and ids repeat when a batch holds a prompt twice (a PPO
        # step can draw one twice): ask under each sample's position instead (not in the cache key).
        items = [(p, replace(s, sample_id=str(i))) for i, (p, s) in enumerate(zip(prompts, samples))]
        verdicts: dict[str, dict[str, Any]] = {}

        async def ask_all() -> None:
            async with judge.session(cache, Tally()):
                await judge_samples(judge, items, num_judgments, lambda v: verdicts.__setitem__(v["sample_id"], v))

        asyncio.run(ask_all())
        return [verdicts[s.sample_id]["score"] for _, s in items]

    return RewardFn(judge.judge_name, score)


def reward_model_reward(path: str | Path, template: str, **score_options: Any) -> RewardFn:
    """The critique reward model's score of each full answer, asked as the policy was (`template`).

    `score_options` are `score_answers`' (num_critiques, max_new_tokens, temperature, batch_size).
    """
    from alignkit.pairs import _conversation
    from alignkit.records import load_image
    from alignkit.reward.model import load_reward_model
    from alignkit.reward.score import Answer, score_answers
    from alignkit.sample.templates import load_template

    rm, tmpl = load_reward_model(path), load_template(template)

    def score(prompts: Sequence[Prompt], samples: Sequence[Sample]) -> list[float | None]:
        answers = [
            Answer(tmpl.messages(p.question, len(p.images)), _conversation("assistant", s.text),
                   [load_image(i) for i in p.images])
            for p, s in zip(prompts, samples)
        ]  # fmt: skip
        return [r.score for r in score_answers(rm, answers, **score_options)]

    return RewardFn(f"reward_model/{Path(path).name}", score)


def load_function(spec: str, key: str = "ppo.rewards") -> Callable[[Prompt, Sample], float]:
    """The function a "module:function" or "path/to/file.py:function" spec names (`key`: the recipe
    key it came from, for errors)."""
    where = f"{key}: function {spec!r}"
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise RecipeError(f"{where}: expected 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise RecipeError(f"{where}: file {file} not found (a relative path is read from {Path.cwd()})")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RecipeError(f"{where}: importing {file} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # a module the user's module imports is missing: their traceback says which
            raise RecipeError(f"{where}: no module named {module_name!r} (is it on PYTHONPATH?)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"{where}: {module_name} has no function {name!r}")
    return fn


def function_reward(spec: str, key: str = "ppo.rewards") -> RewardFn:
    """A Python function `(prompt, sample) -> float` as a reward (`key`: the recipe key it came from)."""
    fn = load_function(spec, key)
    return RewardFn(spec, lambda ps, ss: [fn(p, s) for p, s in zip(ps, ss)])


def combine(weighted: Sequence[tuple[float, RewardFn]]) -> RewardFn:
    """The weighted sum of several rewards; the only reward, unchanged, when there is one with weight 1."""
    if len(weighted) == 1 and weighted[0][0] == 1.0:
        return weighted[0][1]

    def score(prompts: Sequence[Prompt], samples: Sequence[Sample]) -> list[float | None]:
        parts = [(w, fn.scores(prompts, samples)) for w, fn in weighted]
        # an answer with a failed part has no score (counted once in the sum's `failures`)
        return [None if any(p[i] is None for _, p in parts) else sum(w * p[i] for w, p in parts)
                for i in range(len(samples))]  # fmt: skip

    return RewardFn(" + ".join(f"{w:g}*{fn.name}" for w, fn in weighted), score)
