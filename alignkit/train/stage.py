"""The `train` stage: DPO / MM-DPO on the pairs, or PPO / GRPO / RLOO on the prompts, from this round's policy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from alignkit.errors import RecipeError, StageInputError
from alignkit.judge.stage import UNCHANGING as JUDGE_UNCHANGING
from alignkit.judge.stage import judge_files
from alignkit.models.lengths import skipped_summary
from alignkit.records import Prompt, read_records
from alignkit.reward.config import score_options
from alignkit.reward.stage import SCORE_KEYS
from alignkit.sample.stage import SampleStage
from alignkit.stage import Context, launch_files, template_files
from alignkit.tracking import TRACKING_KEYS
from alignkit.train.config import VLLM_SERVER_PLACEMENT


def function_file(spec: str, key: str = "ppo.rewards") -> Path | None:
    """The source file of a `module:function` or `path/file.py:function` reward (its bytes count)."""
    target = spec.rsplit(":", 1)[0]
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise RecipeError(f"{key}: reward function {spec!r}: file {target} not found")
        return Path(target)
    found = importlib.util.find_spec(target) if target else None
    return Path(found.origin) if found and found.origin else None


ONLINE = ("ppo", "grpo", "rloo")  # the methods that sample on the prompts instead of reading pairs


class TrainStage:
    """Train the policy: DPO with LoRA on the pairs (train.method=dpo), MM-DPO with a per-pair beta from the
    reward margin (train.method=mmdpo), or PPO on the prompts (train.method=ppo, or `alignkit ppo`),
    rewarded as the recipe's `ppo.rewards` say, or GRPO / RLOO (train.method=grpo or rloo) rewarded
    as `grpo.rewards` say. Writes a PEFT adapter to train/adapter, or the whole model to train/model
    with train.finetune=full.

    Every method runs as `launch.num_processes` processes (`alignkit.launch`): DPO's and MM-DPO's
    batch_size and PPO's prompts_per_step are per process; the summary records the global batch."""

    name = command = "train"
    per_round = True
    exclude = frozenset({"train.save_steps", "train.gradient_checkpointing", *TRACKING_KEYS, *SampleStage.exclude,
                         *JUDGE_UNCHANGING,
                         *(f"{m}.vllm_server.{k}" for m in ("ppo", "grpo") for k in VLLM_SERVER_PLACEMENT)})  # fmt: skip

    def distributed(self, recipe) -> bool:
        return True

    def config(self, recipe) -> tuple[str, ...]:
        # `launch` counts: the global batch is batch_size x grad_accum x num_processes (PPO's:
        # prompts_per_step x num_processes), and an accelerate config file may set the mixed
        # precision (its bytes are in `reads`).
        if recipe.train.method not in ONLINE:
            return ("train", "seed", "launch", "tracking")
        # PPO, GRPO and RLOO sample as the `sample` section says and score with their `rewards` sources.
        section = "ppo" if recipe.train.method == "ppo" else "grpo"
        return ("train", section, "sample", "judge", *SCORE_KEYS, "seed", "launch", "tracking")

    def reads(self, ctx: Context) -> list[Path]:
        if ctx.config.train.method not in ONLINE:
            return [ctx.paths.pairs, *launch_files(ctx)]
        files = [ctx.paths.prompts, *template_files(ctx.config.sample.template), *launch_files(ctx)]
        for spec in _reward_specs(ctx):
            if spec.source in ("reference", "judge"):
                files += judge_files(ctx.config.judge)
            elif spec.source == "reward_model":
                files.append(Path(spec.path or ctx.paths.reward_model / "model") / "head.safetensors")
            elif (source := function_file(spec.path, _rewards_key(ctx))) is not None:
                files.append(source)
        return list(dict.fromkeys(files))

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {"policy": ctx.lineage.policy_identity(ctx.round)}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.train

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        """Runs in every process of a launch (the main one writes)."""
        from alignkit.models.device import ComputeSettings, process_state

        cfg, model = ctx.config.train, ctx.lineage.policy(ctx.round)
        processes = process_state().num_processes
        if cfg.method == "ppo":
            return _train_ppo(ctx, model, processes)
        if cfg.method in ("grpo", "rloo"):
            return _train_grpo(ctx, model, processes)
        if cfg.method == "mmdpo":
            from alignkit.train.mmdpo import train_mmdpo

            out = train_mmdpo(ctx.paths.pairs, ctx.paths.train, cfg, model=model, seed=ctx.config.seed,
                              ref_cache_dir=ctx.paths.ref_logps, tracking=ctx.tracking(self.name))  # fmt: skip
        else:
            from alignkit.train.dpo import train_dpo

            out = train_dpo(ctx.paths.pairs, ctx.paths.train, cfg, model=model, seed=ctx.config.seed,
                            tracking=ctx.tracking(self.name))  # fmt: skip
        return {Path(out).name: str(out),  # "adapter", or "model" (full fine-tuning)
                **skipped_summary(ctx.paths.train),
                "mixed_precision": ComputeSettings.of(cfg).precision(), "num_processes": processes, "global_batch_size": cfg.batch_size * cfg.grad_accum * processes}  # fmt: skip


def _train_ppo(ctx: Context, model: str, processes: int) -> dict[str, Any]:
    """PPO on prompts.jsonl into train/ (metrics.jsonl, checkpoints/, adapter/ where `eval` finds it),
    in each of `processes` processes.

    K, answer length, temperature, top_p and the template come from the `sample` section, the
    learning rate, LoRA and checkpoint interval from `train`, the rest from `ppo`. The summary's
    global batch is the answers of a step over all processes (prompts_per_step x processes x K).
    """
    from alignkit.models.device import ComputeSettings, process_state
    from alignkit.train.ppo import train_ppo

    cfg, ppo, sample = ctx.config.train, ctx.config.ppo, ctx.config.sample
    if cfg.finetune == "qlora":
        raise StageInputError("train.method ppo supports train.finetune lora or full, not qlora")

    # the main process alone scores (one judge client and verdict cache, one reward model in memory)
    main = process_state().is_main_process
    out = train_ppo(
        read_records(ctx.paths.prompts, Prompt), ctx.paths.train, ppo, model=model, sample=sample, train=cfg,
        reward=_reward(ctx) if main else None, seed=ctx.config.seed, tracking=ctx.tracking("train"),
    )  # fmt: skip
    steps = [json.loads(line) for line in (ctx.paths.train / "metrics.jsonl").read_text().splitlines()]
    prompts = ppo.prompts_per_step * processes
    return {out.name: str(out), **skipped_summary(ctx.paths.train),
            "reward_first": steps[0]["reward/raw"], "reward_last": steps[-1]["reward/raw"],
            "mixed_precision": ComputeSettings.of(cfg).precision(), "num_processes": processes,
            "global_prompts_per_step": prompts, "global_batch_size": prompts * sample.num_samples}  # fmt: skip


def _train_grpo(ctx: Context, model: str, processes: int) -> dict[str, Any]:
    """GRPO or RLOO on prompts.jsonl into train/ (metrics.jsonl, checkpoints/, adapter/ where `eval`
    finds it), in each of `processes` processes; K and the sampling settings come from `sample`."""
    from alignkit.models.device import ComputeSettings, process_state
    from alignkit.train.grpo import train_grpo

    cfg, grpo, sample = ctx.config.train, ctx.config.grpo, ctx.config.sample
    out = train_grpo(
        read_records(ctx.paths.prompts, Prompt), ctx.paths.train, grpo, model=model, sample=sample, train=cfg,
        reward=_reward(ctx) if process_state().is_main_process else None, seed=ctx.config.seed,
        tracking=ctx.tracking("train"),
    )  # fmt: skip
    lines = (ctx.paths.train / "metrics.jsonl").read_text().splitlines()
    steps = [s for s in map(json.loads, lines) if "reward" in s]  # steps that sampled (see grpo.num_iterations)
    prompts = grpo.prompts_per_step * processes
    return {out.name: str(out), **skipped_summary(ctx.paths.train), "reward_first": steps[0]["reward"], "reward_last": steps[-1]["reward"],
            "mixed_precision": ComputeSettings.of(cfg).precision(), "num_processes": processes,
            "global_prompts_per_step": prompts, "global_batch_size": prompts * sample.num_samples}  # fmt: skip


def _rewards_key(ctx: Context) -> str:
    return "ppo.rewards" if ctx.config.train.method == "ppo" else "grpo.rewards"


def _reward_specs(ctx: Context) -> list:
    """The reward sources of the online method: `ppo.rewards` or `grpo.rewards`."""
    return ctx.config.ppo.rewards if ctx.config.train.method == "ppo" else ctx.config.grpo.rewards


def _reward(ctx: Context):
    """The weighted sum of the online method's reward sources (`alignkit.train.rewards`)."""
    from alignkit.train import rewards

    def reward(spec) -> rewards.RewardFn:
        if spec.source == "judge":
            return rewards.judge_reward(ctx.config.judge, ctx.paths.judge_cache)
        if spec.source == "reference":
            reference = ctx.config.judge.model_copy(update={"backend": "reference"})
            return rewards.judge_reward(reference, ctx.paths.judge_cache)
        if spec.source == "reward_model":
            rm_dir = spec.path or ctx.paths.reward_model / "model"
            return rewards.reward_model_reward(rm_dir, ctx.config.sample.template,
                                               **score_options(ctx.config.reward_model))  # fmt: skip
        return rewards.function_reward(spec.path, _rewards_key(ctx))

    return rewards.combine([(spec.weight, reward(spec)) for spec in _reward_specs(ctx)])
