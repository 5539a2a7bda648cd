"""The `train`, `ppo`, `grpo` and `sft` sections: preference training, online RL and supervised fine-tuning."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from alignkit.config import Section


class TrainConfig(Section):
    method: Literal["dpo", "mmdpo", "ppo", "grpo", "rloo"] = "dpo"
    """`dpo` (TRL's DPO), `mmdpo` (MM-RLHF: a per-pair beta from the reward margin, cached reference),
    `ppo` (online RL on the prompts with the `ppo` section's rewards; uses learning_rate, finetune
    (lora or full), lora_*, target_modules and save_steps from here), or `grpo` / `rloo` (TRL's
    group-relative online RL on the prompts with the `grpo` section; the same keys from here)."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature (0.1, as in the DPO paper and TRL); β_ori for `mmdpo`."""
    w: float = Field(0.5, ge=0)
    """mmdpo: how much a large margin raises beta, β = β_ori·(1 + w·(1 − e^(−k·δ))); 0 is plain DPO."""
    k: float = Field(0.5, gt=0)
    """mmdpo: how fast beta saturates with the margin δ (0.5, as in MM-RLHF)."""
    gamma: float = Field(0.0, ge=0)
    """mmdpo: weight of an NLL term on the chosen answer (0: off)."""
    margin_key: str = "margin"
    """mmdpo: the pairs column giving δ: `margin` (judge scores) or `rm_margin` (after the score stage)."""
    finetune: Literal["lora", "qlora", "full"] = "lora"
    """mmdpo: LoRA, QLoRA (4-bit base; CUDA + bitsandbytes only) or full fine-tuning."""
    learning_rate: float = Field(5e-5, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    max_length: int | None = 512
    """dpo, mmdpo: the most tokens of prompt + answer, image tokens included (TRL keeps the first
    max_length); null: no limit. See `train.overlong` for pairs that are longer."""
    overlong: Literal["stop", "skip"] = "stop"
    """A pair longer than max_length (dpo, mmdpo), or a PPO, GRPO or RLOO prompt + sample.max_new_tokens longer than
    the model's context, is never cut: `stop` stops the stage naming every such id, `skip` leaves them
    out (counted in the stage summary). See `alignkit.models.lengths`."""
    save_steps: int = Field(50, ge=1)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    """Compute precision of every stage that trains or scores a model (sft, train, reward_model,
    score): `auto` is the accelerate config file's choice (`launch.config_file`), else bf16 on a GPU
    that has it, else fp32 (`no`). fp16 needs a GPU. See `alignkit.models.device`."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (every training stage); null: on
    with a GPU, off on a CPU. It does not change what is learned."""
    attn_implementation: str | None = None
    """The attention kernel every stage loads its models with (`sdpa`, `eager`, `flash_attention_2`
    (needs the flash-attn package and a GPU), ...); null: transformers' default (sdpa where supported)."""


class RewardSpec(Section):
    """One reward source of PPO, GRPO or RLOO; several are summed with their weights."""

    source: Literal["reference", "judge", "reward_model", "function"] = "reference"
    """`reference`: the reference judge with judge.rubric; `judge`: the recipe's judge section as set
    (an OpenAI-compatible judge through the cached, concurrent judge client); `reward_model`: the
    critique reward model's score; `function`: a Python function (prompt, sample) -> float."""
    weight: float = 1.0
    path: str | None = None
    """reward_model: the reward model directory (default: reward_model/model in the run directory);
    function: "module:function" or "path/to/file.py:function"."""

    @model_validator(mode="after")
    def _function_needs_path(self) -> "RewardSpec":
        if self.source == "function" and not self.path:
            raise ValueError("a reward with source 'function' needs path: 'module:function'")
        if self.source == "function" and not re.fullmatch(r".+:[A-Za-z_]\w*", self.path):
            raise ValueError(f"path {self.path!r}: expected 'module:function' or 'path/to/file.py:function'")
        return self


class VllmServerConfig(Section):
    """Where `ppo.rollout` or `grpo.rollout: vllm_server` samples: a vLLM server on GPUs of its own
    (see `alignkit.train.vllm_server`). Its engine settings are `sample.vllm`'s
    (gpu_memory_utilization or kv_cache_memory, max_model_len, tensor_parallel_size, ...)."""

    url: str | None = None
    """A running vLLM server to use (e.g. http://10.0.0.7:8000; started with `--enable-lora
    --max-lora-rank R` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, able to read this run directory;
    for GRPO also `--logprobs-mode processed_logprobs`, which its importance sampling correction
    needs); null: alignkit starts one for the stage (`python -m vllm.entrypoints.openai.api_server`; its
    output goes to vllm_server.log in the stage's directory) and stops it after."""
    gpus: str | None = None
    """The started server's CUDA_VISIBLE_DEVICES (e.g. "7", or "6,7" with sample.vllm.tensor_parallel_size 2);
    null: the environment's. Start the trainer on the other GPUs (CUDA_VISIBLE_DEVICES=0-5 alignkit run ...)."""
    port: int | None = Field(None, ge=1, le=65535)
    """The started server's port on 127.0.0.1; null: a free one."""
    args: list[str] = []
    """More command-line arguments for the started server (e.g. ["--max-num-seqs", "64"])."""
    api_key_env: str = "VLLM_API_KEY"
    """The environment variable holding the server's API key; for a started server, unset means a new random key."""
    start_timeout: float = Field(600.0, gt=0)
    """Seconds to wait for a started server's /health (loading a 7B model takes a minute or two)."""

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # `gpus=7` on the command line is a number


# `ppo.vllm_server` / `grpo.vllm_server` keys that say where the server runs, not what it samples: no re-run when they change
VLLM_SERVER_PLACEMENT = frozenset({"url", "gpus", "port", "api_key_env", "start_timeout"})


class PpoConfig(Section):
    """PPO (train.method: ppo). Answers are sampled as the `sample` section says (num_samples,
    max_new_tokens, temperature, top_p, template, vllm); the learning rate, LoRA, fine-tuning mode
    and checkpoint interval come from `train`. Defaults follow Schulman et al. 2017 and cleanrl's
    ppo.py for the optimisation, and Ziegler et al. 2019 / TRL's PPOTrainer (removed in TRL 1.13)
    for the language-model parts (γ = 1, the KL penalty, a small value-loss weight)."""

    rollout: Literal["transformers", "vllm", "vllm_server"] = "transformers"
    """Rollout engine: `transformers` generates with the policy in training, `sample.batch_size`
    prompts per call (a divisor of prompts_per_step: then any process count samples the same
    answers, see `alignkit.train.ppo`); `vllm` loads the current LoRA adapter into a vLLM engine
    beside the trainer, on its GPU, before every rollout batch (LoRA only, launch.num_processes 1);
    `vllm_server` loads it into a vLLM server on GPUs of its own (`vllm_server`; LoRA only, any
    number of processes)."""
    vllm_server: VllmServerConfig = VllmServerConfig()
    """The server of `rollout: vllm_server`."""
    rewards: list[RewardSpec] = [RewardSpec()]
    """The reward sources, summed with their weights."""
    steps: int = Field(100, ge=1)
    """PPO steps; each samples one rollout batch and runs `ppo_epochs` passes over it."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts per rollout batch per process (per device): a step's global batch holds
    prompts_per_step × launch.num_processes prompts and that × sample.num_samples answers; any
    split of the same global batch takes the same steps (see `alignkit.train.ppo`)."""
    ppo_epochs: int = Field(4, ge=1)
    """Passes over each rollout batch (cleanrl `update_epochs`, TRL `num_ppo_epochs`)."""
    num_minibatches: int = Field(4, ge=1)
    """Minibatches per pass (cleanrl); each is global rollout batch / num_minibatches answers, split
    between the processes (each must get at least one answer)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount. 1.0 for text (TRL): the only non-KL reward comes at the last token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ (Schulman et al. 2016; cleanrl, TRL)."""
    clip_range: float = Field(0.2, gt=0)
    """Policy ratio clip ε (PPO paper, cleanrl `clip_coef`)."""
    clip_range_value: float = Field(0.2, gt=0)
    """Value clip: new values stay within ± this of the rollout's values (cleanrl `clip_vloss`, TRL)."""
    vf_coef: float = Field(0.1, ge=0)
    """Value-loss weight (TRL; cleanrl's 0.5 lets a shared backbone's value loss swamp the policy's)."""
    ent_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight (0 for LMs, as in TRL; the KL penalty already keeps the policy spread)."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Global gradient-norm clip (cleanrl)."""
    whiten_advantages: bool = True
    """Advantages to mean 0, std 1 over the batch's response tokens (cleanrl `norm_adv`, TRL)."""
    kl_coef: float = Field(0.05, ge=0)
    """β of the per-token KL penalty to the reference policy (TRL); the initial β when adaptive."""
    target_kl: float | None = Field(None, gt=0)
    """Adaptive KL (Ziegler et al. 2019): β moves so the per-answer KL approaches this (their 6
    nats); null keeps β fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive KL horizon in answers: how slowly β moves (Ziegler et al. 2019)."""
    normalize_rewards: bool = True
    """Scale scores by a running mean/std over all answers so far (Ziegler et al. normalise their
    reward model likewise): judge scores in [0, 1] and reward-model logits get one scale, so β and
    the learning rate mean the same thing for any reward source."""
    reward_clip: float = Field(10.0, ge=0)
    """Normalised scores are clipped to ± this (the VecNormalize default cleanrl uses); 0 turns clipping off."""
    value_model: Literal["shared", "separate"] = "shared"
    """`shared`: the value head reads the policy's hidden states (one forward, as TRL's value-head
    model); `separate`: a second backbone (same base, own LoRA) for the value, as in InstructGPT."""


class GrpoConfig(Section):
    """GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024) through TRL's
    `GRPOTrainer` / `RLOOTrainer` (train.method: grpo or rloo). Each step samples
    `sample.num_samples` answers (TRL's num_generations, the group) for each of `prompts_per_step`
    prompts with the `sample` section's max_new_tokens, temperature and top_p; the learning rate,
    LoRA, fine-tuning mode and checkpoint interval come from `train`. An answer whose reward failed
    (a judge verdict that never came) is left out of its group's baseline and gets advantage 0."""

    rollout: Literal["transformers", "vllm", "vllm_server"] = "transformers"
    """Generation engine: `transformers` (TRL's own generate on the policy in training);
    `vllm_server` loads the current LoRA adapter into a vLLM server on GPUs of its own before each
    rollout (`vllm_server`; LoRA only, any number of processes; see `alignkit.train.grpo`); `vllm`
    (TRL's colocate mode) is not supported yet (a clear error)."""
    vllm_server: VllmServerConfig = VllmServerConfig()
    """The server of `rollout: vllm_server` (as `ppo.vllm_server`)."""
    rewards: list[RewardSpec] = [RewardSpec()]
    """The reward sources, summed with their weights (as `ppo.rewards`)."""
    steps: int = Field(100, ge=1)
    """Optimizer steps; each samples a fresh group of answers per prompt."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts per step per process (per device): a step trains on prompts_per_step x
    launch.num_processes x sample.num_samples answers."""
    beta: float = Field(0.04, ge=0)
    """Weight of the KL term to the reference policy (the LoRA adapter disabled; a frozen copy with
    full fine-tuning): 0.04 as in the GRPO paper (TRL's defaults are 0 for GRPO, 0.05 for RLOO)."""
    epsilon: float = Field(0.2, gt=0)
    """Clip range of the policy ratio (GRPO paper, TRL)."""
    num_iterations: int = Field(1, ge=1)
    """μ: optimizer steps on each sampled batch (1, as TRL: the ratio is then exactly 1). Each counts
    in `steps`; only the steps that sample log the reward in metrics.jsonl."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """grpo only: how token losses are averaged (TRL's default `dapo`: over all tokens of the batch;
    `grpo`: per answer, then over answers, as the paper; `dr_grpo`: by a constant, Liu et al. 2025)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo only: divide advantages by the group's reward std (the paper), the batch's, or not at all
    (Dr. GRPO). RLOO's advantage is the reward minus the mean of the other answers of its group."""


class SftSyntheticConfig(Section):
    world: Literal["shapes"] = "shapes"
    num_examples: int = Field(2048, ge=1)
    seed: int = 1
    """Seed of the SFT images (keep it apart from data.synthetic.seed and eval's)."""
    error_rate: float = Field(0.6, ge=0, le=1)
    """Share of SFT answers that hallucinate one object that is not in the image (see
    `worlds.shapes.perceived_answer`); above 0.5 the greedy base policy hallucinates."""
    tasks: list[Literal["describe", "count", "exists", "color"]] = ["describe", "count", "exists", "color"]
    """Question kinds of the SFT examples, in turn (as `data.synthetic.tasks`)."""
    yes_bias: float = Field(1.0, ge=0, le=1)
    """Share of the hallucinations on an existence question about an absent object that see that very
    object, so the answer says "yes" (1: POPE's yes-bias, 80% of existence answers "yes" at
    error_rate 0.6); 0: another absent object, answers half "yes", half "no", each following the
    listed scene (a base that looks the asked object up in its list; README, shapes-grpo)."""
    exists_answer_first: bool = False
    """Existence reasonings open with the asked object and the answer, then list the scene ("A red
    circle: no. I see 2 shapes: ..."): a small model learns to check the image for the asked object
    there, next to the question, and not from a list of varying length (README, shapes-grpo)."""


class SftConfig(Section):
    """Supervised fine-tuning before preference training; its model becomes the policy."""

    data: str | None = None
    """SFT examples as jsonl: TRL prompt-completion conversations plus `images` (relative paths)."""
    synthetic: SftSyntheticConfig | None = None
    """Or SFT data from the synthetic shapes world, answers in the sampling template's format."""
    allow_outside_paths: bool = False
    """Let image paths in `data` point outside its directory (`../`, absolute paths)."""
    finetune: Literal["full", "lora"] = "full"
    learning_rate: float = Field(1e-3, gt=0)
    """1e-3 trains the tiny model from scratch; use ~1e-4 with LoRA on a pretrained VLM."""
    max_steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=1)
    """Examples per process (per device) in each micro-batch. A step trains on the global batch,
    batch_size × grad_accum × launch.num_processes examples; any split of the same global batch
    takes the same step (see `alignkit.train.sft`)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per step and process (a larger global batch in the same memory)."""
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    save_steps: int = Field(250, ge=1)
    logging_steps: int = Field(25, ge=1)
    """Steps per line of metrics.jsonl (the mean loss over them)."""
    overlong: Literal["stop", "skip"] = "stop"
    """An example longer than the model's context (image tokens counted) is never cut: `stop` stops
    the stage naming every such id, `skip` leaves them out (counted in the stage summary)."""
    phases: list[dict[str, Any]] = []
    """Further phases after the one this section describes (a curriculum), each fine-tuning the
    previous phase's model: an entry holds the keys it changes (`synthetic` merged key by key), e.g.
    `[{synthetic: {tasks: [describe, count, exists, color]}, learning_rate: 3.0e-4, max_steps: 1500}]`.
    Phase n's model is kept in sft/phase-<n>/model, and a re-run does not redo a finished phase;
    the last phase's model is sft/model. Every phase but the last trains full weights."""

    def phase_configs(self) -> list[SftConfig]:
        """This section and each of `phases` as a whole `sft` section, in training order."""
        base = self.model_dump(exclude={"phases"})
        return [SftConfig.model_validate(base), *(SftConfig.model_validate(_merged(base, c)) for c in self.phases)]

    @model_validator(mode="after")
    def _phases_valid(self) -> SftConfig:
        base = self.model_dump(exclude={"phases"})
        for n, change in enumerate(self.phases):
            if "phases" in change:
                raise ValueError(f"phases[{n}]: a phase cannot have phases of its own")
            try:
                SftConfig.model_validate(_merged(base, change))
            except ValidationError as e:
                first = e.errors()[0]
                raise ValueError(f"phases[{n}].{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        for n, change in enumerate([{}, *self.phases[:-1]]):
            if self.phases and _merged(base, change)["finetune"] != "full":
                where = "the section itself" if n == 0 else f"phases[{n - 1}]"
                raise ValueError(f"{where} trains a LoRA adapter, but the next phase starts from its model: "
                                 "every phase but the last trains full weights")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_source(self) -> "SftConfig":
        if (self.data is None) == (self.synthetic is None):
            raise ValueError("set exactly one of sft.data or sft.synthetic")
        return self


def _merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """An `sft` section dump with a phase's changes: its keys replace the section's, `synthetic`'s key by key."""
    merged = base | change
    if isinstance(base.get("synthetic"), dict) and isinstance(change.get("synthetic"), dict):
        merged["synthetic"] = base["synthetic"] | change["synthetic"]
    return merged
