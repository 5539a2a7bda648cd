"""GRPO and RLOO for vision-language models, through TRL's `GRPOTrainer` / `RLOOTrainer`.

Each step draws `grpo.prompts_per_step` image+question prompts per process, samples
`sample.num_samples` answers to each (the group; TRL's `num_generations`) with TRL's own
transformers generation, scores every answer with alignkit's reward (`alignkit.train.rewards`:
judges, reward model, functions, summed with weights) and takes one policy-gradient step:

- GRPO (Shao et al. 2024): advantage = (r − mean of the group) / std of the group (TRL
  `scale_rewards`), clipped ratio, KL to the reference weighted by `grpo.beta`;
- RLOO (Ahmadian et al. 2024): advantage = r − mean of the *other* answers of the group.

A failed reward (a judge verdict that never came: `RewardFn.scores` gives None) is handed to TRL as
None. TRL (1.16) leaves such an answer out of its group's mean, std and leave-one-out baseline and
gives it advantage 0: it neither teaches nor shifts the others. It is counted in `reward/failures`.

Rewards are scored by the main process alone, for the whole step (the answers of every process are
gathered, then the scores broadcast), so one judge client, verdict cache and rate budget serve a
launch, as in `alignkit.train.ppo`.

Run directory (as `alignkit.train.common`): `checkpoints/` (TRL checkpoints, `run.key`),
`metrics.jsonl` (one line per step: loss, reward, reward_std, kl, entropy, clip ratios, ...) and
the final `adapter/` (LoRA) or `model/` (full fine-tuning) with the processor, where `eval` finds
it. A re-run with the same settings resumes from the last complete checkpoint; more `grpo.steps`
extend a finished run (the learning rate is constant, as PPO's).

Generation through vLLM (TRL's `use_vllm` colocate mode) is not supported yet: `grpo.rollout: vllm`
is a `RecipeError`. Tried on the CPU with the tiny Qwen2-VL and LoRA: TRL 1.16 starts the colocated
engine, then its weight copy before the first rollout fails inside vLLM 0.32's Qwen2-VL
`load_weights` (a [384, 128] weight into an empty parameter); TRL supports vLLM up to 0.31.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import RecipeError
from alignkit.records import Prompt, Sample, sample_id
from alignkit.sample.config import SampleConfig
from alignkit.tracking import Tracking
from alignkit.train.config import GrpoConfig, TrainConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from alignkit.sample.templates import Template


def prompt_dataset(prompts: Sequence[Prompt], template: Template) -> Dataset:
    """TRL's conversational prompt format: the rendered question as the user turn (TRL puts one image
    slot per image before it, as `Template.messages` does), the images, and the prompt id (which
    TRL hands to the reward function)."""
    from datasets import Dataset

    from alignkit.sample import to_request

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": template.render(p.question)}],
         "images": to_request(p, template).images, "prompt_id": p.prompt_id}
        for p in prompts
    ])  # fmt: skip


class GroupReward:
    """alignkit's reward as a TRL reward function: (prompts, completions, prompt_id, ...) -> scores,
    None where scoring failed. The main process scores the answers of every process."""

    __name__ = "alignkit"  # TRL names the reward's metrics by it: rewards/alignkit/mean

    def __init__(self, reward: Callable | None, prompts: Sequence[Prompt], template: Template, max_new_tokens: int):
        self.reward, self.template, self.max_new_tokens = reward, template, max_new_tokens
        self.prompts = {p.prompt_id: p for p in prompts}

    def __call__(self, prompts: list, completions: list, completion_ids: list, prompt_id: list[str],
                 log_metric: Callable[[str, float], None] | None = None, **_: Any) -> list[float | None]:  # fmt: skip
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, gather_object

        state = PartialState()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths = [len(ids) for ids in completion_ids]
        everything = gather_object(list(zip(prompt_id, texts, lengths)))
        box: list[Any] = [None]
        if state.is_main_process:
            failures = getattr(self.reward, "failures", 0)
            samples = [self._sample(pid, text, n, k) for k, (pid, text, n) in enumerate(everything)]
            box = [(self._score([self.prompts[s.prompt_id] for s in samples], samples),
                    getattr(self.reward, "failures", 0) - failures)]  # fmt: skip
        if state.num_processes > 1:
            broadcast_object_list(box)
        scores, failures = box[0]
        if log_metric is not None:
            log_metric("reward/failures", failures)
        mine = len(texts)
        return scores[state.process_index * mine : (state.process_index + 1) * mine]

    def _score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float | None]:
        scores = self.reward.scores if hasattr(self.reward, "scores") else self.reward
        return list(scores(prompts, samples))

    def _sample(self, prompt_id: str, text: str, num_tokens: int, k: int) -> Sample:
        reasoning, answer, parsed = self.template.parse(text)
        finish = "length" if num_tokens >= self.max_new_tokens else "stop"
        return Sample(sample_id(prompt_id, k), prompt_id, text, reasoning, answer, parsed,
                      num_tokens, finish, "grpo-policy")  # fmt: skip


def grpo_trainer(
    prompts: Sequence[Prompt],
    out_dir: Path,
    cfg: GrpoConfig = GrpoConfig(),
    *,
    model: str,
    reward: Callable | None,
    sample: SampleConfig = SampleConfig(),
    train: TrainConfig = TrainConfig(method="grpo"),
    seed: int = 0,
    tracking: Tracking | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """TRL's `GRPOTrainer` (train.method grpo) or `RLOOTrainer` (rloo) set up on `prompts`, and the
    settings that decide whether an old checkpoint can be resumed (see `train_grpo`)."""
    from alignkit.models import load_policy, lora_config, resolve_model
    from alignkit.models.device import ComputeSettings, process_state
    from alignkit.models.lengths import write_skipped
    from alignkit.sample.templates import load_template
    from alignkit.train.common import MetricsJsonl, trainer_args
    from alignkit.train.ppo import fitting_prompts

    if train.method not in ("grpo", "rloo"):
        raise RecipeError(f"train.method: {train.method!r} is not grpo or rloo")
    if cfg.rollout == "vllm":
        raise RecipeError("grpo.rollout: vllm (TRL's colocate mode) is not supported yet: TRL 1.16 starts the engine "
                          "but its per-step weight copy into vLLM 0.32's Qwen2-VL fails; use grpo.rollout=transformers")  # fmt: skip
    if train.finetune == "qlora":
        raise RecipeError(f"train.method {train.method} supports train.finetune lora or full, not qlora")
    if sample.num_samples < 2:
        raise RecipeError(f"sample.num_samples={sample.num_samples}: {train.method} compares the answers of a "
                          "group, so it needs at least 2 per prompt")  # fmt: skip
    out_dir, compute, tmpl = Path(out_dir), ComputeSettings.of(train), load_template(sample.template)
    model_path = resolve_model(model)
    policy, processor = load_policy(model_path, dtype=compute.dtype(), **compute.load_options())
    prompts, skipped = fitting_prompts(prompts, processor, policy.config, tmpl, sample.max_new_tokens, train.overlong)
    if process_state().is_main_process:
        write_skipped(out_dir, skipped)
    peft = None
    if train.finetune == "lora":
        peft = lora_config(train.lora_r, train.lora_alpha, train.lora_dropout, train.target_modules, model=policy)

    common = dict(
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.prompts_per_step * sample.num_samples,  # answers, K per prompt
        num_generations=sample.num_samples,
        max_completion_length=sample.max_new_tokens,
        temperature=sample.temperature,
        top_p=sample.top_p,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations,
        lr_scheduler_type="constant",
        logging_steps=1,
        **trainer_args(out_dir, train, seed=seed),
    )
    if train.method == "grpo":
        from trl import GRPOConfig as Args
        from trl import GRPOTrainer as Online

        common |= dict(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)
    else:
        from trl import RLOOConfig as Args
        from trl import RLOOTrainer as Online

    trainer = Online(
        model=policy,
        reward_funcs=GroupReward(reward, prompts, tmpl, sample.max_new_tokens),
        args=Args(**common),
        train_dataset=prompt_dataset(prompts, tmpl),
        processing_class=processor,
        peft_config=peft,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", tracking)],
    )

    # anything that changes what is learned invalidates old checkpoints; the global batch counts
    config = cfg.model_dump(mode="json", exclude={"steps", "rewards"})
    settings = {"method": train.method, "config": config, "model": model_path, "seed": seed,
                "processes": process_state().num_processes,
                "sample": sample.model_dump(include={"num_samples", "max_new_tokens", "temperature", "top_p", "template"}),
                "train": train.model_dump(include={"learning_rate", "finetune", "lora_r", "lora_alpha", "lora_dropout",
                                                   "target_modules"}),
                "reward": getattr(reward, "name", repr(reward)), "prompts": [p.prompt_id for p in prompts],
                "compute": [compute.precision(), compute.attn_implementation]}  # fmt: skip
    return trainer, settings


def train_grpo(
    prompts: Sequence[Prompt],
    out_dir: Path,
    cfg: GrpoConfig = GrpoConfig(),
    *,
    model: str,
    reward: Callable | None,
    sample: SampleConfig = SampleConfig(),
    train: TrainConfig = TrainConfig(method="grpo"),
    seed: int = 0,
    tracking: Tracking | None = None,
) -> Path:
    """Train `model` with GRPO or RLOO (`train.method`) on `prompts`; returns `out_dir/adapter`
    (LoRA) or `out_dir/model` (full fine-tuning).

    `cfg` is the `grpo` section; answers are sampled as `sample` says (K = num_samples,
    max_new_tokens, temperature, top_p, template); `train` gives the learning rate, `finetune`,
    LoRA and checkpoint interval. `reward` is an `alignkit.train.rewards.RewardFn` (or a callable
    `(prompts, samples) -> list[float | None]` with a `name`); only the main process calls it (the
    others may pass None). Run it in every process of a launch.
    """
    from alignkit.train.common import resume_point, save_final, show_progress

    trainer, settings = grpo_trainer(prompts, out_dir, cfg, model=model, reward=reward, sample=sample, train=train,
                                     seed=seed, tracking=tracking)  # fmt: skip
    resume_from = resume_point(Path(out_dir), settings)
    show_progress(trainer)
    trainer.train(resume_from_checkpoint=resume_from)
    return save_final(trainer, Path(out_dir) / ("adapter" if train.finetune == "lora" else "model"))
