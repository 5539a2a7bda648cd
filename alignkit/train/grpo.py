"""GRPO and RLOO for vision-language models, through TRL's `GRPOTrainer` / `RLOOTrainer`.

Each step draws `grpo.prompts_per_step` image+question prompts per process, samples
`sample.num_samples` answers to each (the group; TRL's `num_generations`) with TRL's own
transformers generation (or a vLLM server, below), scores every answer with alignkit's reward
(`alignkit.train.rewards`: judges, reward model, functions, summed with weights) and takes one
policy-gradient step:

- GRPO (Shao et al. 2024): advantage = (r − mean of the group) / std of the group (TRL
  `scale_rewards`), clipped ratio, KL to the reference weighted by `grpo.beta`;
- RLOO (Ahmadian et al. 2024): advantage = r − mean of the *other* answers of the group.

The transformers generation never samples an image placeholder (`alignkit.models.inputs.placeholder_ids`:
TRL's `generation_kwargs` `suppress_tokens`): the training forward would read one as an image slot
without pixels (TRL itself suppresses `image_token_id` alone, not e.g. Qwen2-VL's video pad), and it
is not text to train on. The server rollouts cut answers before one instead (as PPO's).

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

Rollouts from a vLLM server (`grpo.rollout: vllm_server`; LoRA only, any number of processes)
reuse PPO's server machinery (`alignkit.train.vllm_server`: started and stopped with the stage,
or `grpo.vllm_server.url`), plugged into TRL's own vLLM seam: the trainer is built without vLLM,
then gets `use_vllm` and a `ServerGeneration` as its `vllm_generation`. At each new step TRL calls
its `sync_weights` (the main process saves the LoRA adapter and loads it into the server under a
new name, then every process waits), then its `generate` with the batch's prompt token ids as TRL
rendered them: each process sends its own prompts as chat requests with their images, K answers
each, and hands TRL the sampled token ids (cut before an image placeholder, as PPO's) with the
server's log-prob of each. GRPO's vLLM importance sampling correction (TRL's default, on) weighs
each token by exp(trainer log-prob − server log-prob), clipped: a started server returns the
log-probs after temperature and top_p (`--logprobs-mode processed_logprobs`, as TRL's own vLLM
modes), so the ratio is 1 up to numerics and the correction only removes the engines' mismatch; a
`url` server must be started so too. `sampling/sampling_logp_difference/{mean,max}` in
metrics.jsonl is that mismatch. RLOO takes the ids alone. The server renders each prompt from its
chat messages; the first request's rendering is compared with TRL's token ids (an error if they
differ, since the answers would be trained in another context than sampled in).

TRL's vLLM colocate mode is not supported: `grpo.rollout: vllm` is a `RecipeError`. Tried on the
CPU with the tiny Qwen2-VL and LoRA: TRL 1.16 starts the colocated engine, then its weight copy
before the first rollout fails inside vLLM 0.32's Qwen2-VL `load_weights` (a [384, 128] weight
into an empty parameter); TRL supports vLLM up to 0.31. It is kept as that error (not dropped from
the choices) to point a PPO user's `rollout: vllm` at `vllm_server`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import RecipeError, SetupError
from alignkit.records import Prompt, Sample, sample_id
from alignkit.sample.base import Request, derive_seed
from alignkit.sample.config import SampleConfig
from alignkit.tracking import Tracking
from alignkit.train.config import VLLM_SERVER_PLACEMENT, GrpoConfig, TrainConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from alignkit.sample.templates import Template
    from alignkit.train.vllm_server import ServerRollouts


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


class ServerSampling:
    """Mixin for TRL's `GRPOTrainer` / `RLOOTrainer` with `grpo.rollout: vllm_server`: tells the
    `ServerGeneration` the prompt ids of each generation batch (TRL hands its `generate` token ids only)."""

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self.vllm_generation.batch = [x["prompt_id"] for x in inputs]
        return super()._generate_and_score_completions(inputs)


class ServerGeneration:
    """TRL's vLLM seam (`trainer.vllm_generation`: `sync_weights`, `generate`) on a vLLM server
    (`alignkit.train.vllm_server.ServerRollouts`); see the module docstring."""

    def __init__(self, trainer: Trainer, rollouts: ServerRollouts, prompts: Sequence[Prompt], template: Template,
                 seed: int, placeholders: frozenset[int], eos_id: int):  # fmt: skip
        """`placeholders`: the policy's image placeholder ids (`alignkit.models.inputs.placeholder_ids`)."""
        self.trainer, self.rollouts, self.template, self.seed = trainer, rollouts, template, seed
        self.placeholders, self.eos_id = placeholders, eos_id
        self.prompts = {p.prompt_id: p for p in prompts}
        self.batch: list[str] = []  # the prompt id of each row of TRL's generation batch (`ServerSampling`)

    def sync_weights(self) -> None:
        """The policy's adapter into the server (TRL calls it at each new step, in every process)."""
        self.rollouts.sync(self.trainer.model, self.trainer.state.global_step)

    def generate(self, prompts: list[list[int]], images: list[list | None] | None, num_generations: int,
                 profiler: Any = None) -> tuple[list[list[int]], list[list[int]], list[list[list[float | None]]], None]:  # fmt: skip
        """TRL's `VLLMGeneration.generate`. `prompts`: the token ids of this process's rows, each prompt
        K = `num_generations` times in a row (TRL's sampler); `images`: their image lists. Returns the
        prompt ids, each answer's sampled ids (up to an image placeholder: `alignkit.train.ppo.answer_tokens`),
        the server's log-prob of each of them in TRL's top-k shape ([[logp], ...]; None where an
        answer was cut to nothing and stands as the end-of-sequence token), and no top-k ids."""
        from alignkit.train.ppo import answer_tokens

        k, rows = num_generations, self.batch
        if len(rows) != len(prompts) or any(rows[i] != rows[i - i % k] for i in range(len(rows))):
            raise SetupError(f"grpo.rollout vllm_server: TRL's generation batch ({len(prompts)} rows) is not the "
                             f"{len(rows)} dataset rows seen, K={k} in a row: this TRL version's rollout order differs")  # fmt: skip
        # a request's id is its prompt's place in the step's global batch (the server seeds it by it)
        offset = self.trainer.accelerator.process_index * (len(rows) // k)
        requests = []
        for j, i in enumerate(range(0, len(rows), k)):
            pictures = list(images[i] or []) if images else []
            messages = self.template.messages(self.prompts[rows[i]].question, len(pictures))
            requests.append(Request(f"{offset + j}:{rows[i]}", messages, pictures))
        seed = derive_seed(self.seed, "rollout", self.trainer.state.global_step)
        with profiler or nullcontext():
            answers = self.rollouts.generate(requests, k, seed, prompt_ids=prompts[::k])
        completion_ids, logprobs = [], []
        for g in (g for gens in answers for g in gens):
            ids = answer_tokens(g.token_ids, self.placeholders, self.eos_id)
            completion_ids.append(ids)
            logprobs.append([[lp] for lp in g.logprobs[: len(ids)]] if g.token_ids[: len(ids)] == ids else [[None]])
        return prompts, completion_ids, logprobs, None


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
    stack: ExitStack | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """TRL's `GRPOTrainer` (train.method grpo) or `RLOOTrainer` (rloo) set up on `prompts`, and the
    settings that decide whether an old checkpoint can be resumed (see `train_grpo`). With
    `cfg.rollout` vllm_server, the stop of the server it starts goes on `stack` (needed then)."""
    from alignkit.models import load_policy, lora_config, resolve_model
    from alignkit.models.device import ComputeSettings, process_state
    from alignkit.models.inputs import placeholder_ids
    from alignkit.models.lengths import write_skipped
    from alignkit.sample.templates import load_template
    from alignkit.train.common import MetricsJsonl, trainer_args
    from alignkit.train.ppo import fitting_prompts, rollout_limit, save_rollout_adapter
    from alignkit.train.vllm_server import ServerRollouts, serve

    if train.method not in ("grpo", "rloo"):
        raise RecipeError(f"train.method: {train.method!r} is not grpo or rloo")
    if cfg.rollout == "vllm":
        raise RecipeError("grpo.rollout: vllm (TRL's colocate mode) is not supported yet: TRL 1.16 starts the engine "
                          "but its per-step weight copy into vLLM 0.32's Qwen2-VL fails; use grpo.rollout=transformers, "
                          "or vllm_server (a vLLM server on GPUs of its own)")  # fmt: skip
    if train.finetune == "qlora":
        raise RecipeError(f"train.method {train.method} supports train.finetune lora or full, not qlora")
    if cfg.rollout == "vllm_server" and train.finetune != "lora":
        raise RecipeError(f"grpo.rollout: vllm_server needs train.finetune lora, not {train.finetune}: it loads the "
                          "policy's LoRA adapter into the server each step")  # fmt: skip
    if sample.num_samples < 2:
        raise RecipeError(f"sample.num_samples={sample.num_samples}: {train.method} compares the answers of a "
                          "group, so it needs at least 2 per prompt")  # fmt: skip
    out_dir, compute, tmpl = Path(out_dir), ComputeSettings.of(train), load_template(sample.template)
    model_path = resolve_model(model)
    main = process_state().is_main_process
    if cfg.rollout == "vllm_server":  # started first: the server loads the model while the trainer does
        if stack is None:
            raise ValueError("grpo_trainer: grpo.rollout vllm_server needs a `stack` to stop its server on")
        server, root, session = serve(stack, cfg.vllm_server, "grpo", model_path, sample.vllm.model_dump(exclude_none=True),
                                      train.lora_r, out_dir / "vllm_server.log", main)  # fmt: skip
    policy, processor = load_policy(model_path, dtype=compute.dtype(), **compute.load_options())
    limit = rollout_limit(cfg.rollout, cfg.vllm_server.url, sample.vllm.model_dump(exclude_none=True))
    prompts, skipped = fitting_prompts(prompts, processor, policy.config, tmpl, sample.max_new_tokens, train.overlong,
                                       limit)  # fmt: skip
    if main:
        write_skipped(out_dir, skipped)
    peft = None
    if train.finetune == "lora":
        peft = lora_config(train.lora_r, train.lora_alpha, train.lora_dropout, train.target_modules, model=policy)

    placeholders = frozenset(placeholder_ids(policy.config))
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
        generation_kwargs={"suppress_tokens": sorted(placeholders)} if placeholders else None,  # see the docstring
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
    if cfg.rollout == "vllm_server":
        Online = type(Online.__name__, (ServerSampling, Online), {})

    trainer = Online(
        model=policy,
        reward_funcs=GroupReward(reward, prompts, tmpl, sample.max_new_tokens),
        args=Args(**common),
        train_dataset=prompt_dataset(prompts, tmpl),
        processing_class=processor,
        peft_config=peft,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", tracking)],
    )
    if cfg.rollout == "vllm_server":  # TRL's vLLM seam, on the server (see the module docstring)
        rollouts = ServerRollouts(root, session, processor, out_dir / "rollout_adapter", main=main,
                                  barrier=trainer.accelerator.wait_for_everyone, server=server, cfg=cfg.vllm_server,
                                  sample=sample, save=save_rollout_adapter, section="grpo", logprobs=True)  # fmt: skip
        trainer.vllm_generation = ServerGeneration(trainer, rollouts, prompts, tmpl, seed, placeholders,
                                                   processor.tokenizer.eos_token_id)  # fmt: skip
        # `server`: no code path of TRL's colocate mode (its engine object) is taken
        trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, "server", -1

    # anything that changes what is learned invalidates old checkpoints; the global batch counts
    config = cfg.model_dump(mode="json", exclude={"steps": True, "rewards": True, "vllm_server": VLLM_SERVER_PLACEMENT})
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

    out_dir = Path(out_dir)
    with ExitStack() as stack:  # a started vLLM server stops when training ends or fails
        trainer, settings = grpo_trainer(prompts, out_dir, cfg, model=model, reward=reward, sample=sample, train=train,
                                         seed=seed, tracking=tracking, stack=stack)  # fmt: skip
        resume_from = resume_point(out_dir, settings)
        show_progress(trainer)
        trainer.train(resume_from_checkpoint=resume_from)
        final = save_final(trainer, out_dir / ("adapter" if train.finetune == "lora" else "model"))
    if trainer.is_world_process_zero():
        shutil.rmtree(out_dir / "rollout_adapter", ignore_errors=True)  # the server's last adapter
    return final
