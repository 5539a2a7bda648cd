"""PPO for vision-language models in one file, in the manner of cleanrl's ppo.py.

Each step:

    # rollout      K answers per image+text prompt from the current policy (transformers or vLLM)
    # rewards      one score per answer (judge, reward model, function); running mean/std scaling, clipping
    # forward      log-probs of the sampled tokens under the policy and the reference, values
    # kl penalty   per-token reward -β·(log π − log π_ref), the scaled score added on the final token
    # advantages   GAE(γ, λ) over the response tokens, whitened
    # update       `ppo_epochs` passes over shuffled minibatches: clipped policy loss + clipped value loss
    # kl control   β adapts toward `target_kl` (Ziegler et al. 2019), when set
    # log + checkpoint

The reference policy is the policy with its LoRA adapter disabled, so there is no second copy
(full fine-tuning keeps a frozen one). The value head reads the policy's last hidden states
(`value_model="shared"`) or a second backbone of its own (`"separate"`). Sampled token ids are
trained on as sampled (never re-tokenized from text), so the importance ratio is exact.

Run directory (as in `alignkit.train.common`): `checkpoints/checkpoint-N/` (the PEFT adapter
or model, then the trainable weights of policy and value head, optimizer, RNG, reward statistics
and KL coefficient as in `alignkit.models.checkpoint`, `trainer_state.json` last), `metrics.jsonl`
(one line per step), and the final `adapter/` (or `model/` after full fine-tuning) with the processor. A re-run with the same settings resumes
from the last complete checkpoint; rollouts are seeded per step, so a resumed run is the run
that was killed.

Devices and processes come from accelerate (`alignkit.models.device`), as in `alignkit.train.sft`:
the same loop runs as one process or as N (`alignkit run RECIPE launch.num_processes=N`, see
`alignkit.launch`), and any split of the same global batch takes the same steps:

- batch: `ppo.prompts_per_step` is per process. A step draws prompts_per_step × N prompts (the
  global batch, prompts_per_step × N × K answers) from one seeded order; process r samples the
  answers of slice r of them.
- rollouts: the answers must not depend on how the prompts are split. vLLM seeds each request by
  its id (here: its place in the step's global batch), so any split samples the same answers.
  The transformers engine draws a whole `generate` batch from one seed, so it generates in groups
  of `sample.batch_size` prompts at fixed places of the global batch (group g: prompts
  g·B … g·B + B − 1, seeded by (seed, step, g)). When `sample.batch_size` divides
  `ppo.prompts_per_step`, every process holds whole groups and any split samples the same
  answers as one process; otherwise a group split between two processes is sampled in two parts
  (still seeded and resumable, but other answers than one process would draw). Batch 1 always
  splits cleanly, at a cost: measured on the 2-core CPU with the tiny Qwen2-VL (8 prompts × K=4,
  32 tokens), one prompt per call took 1.7–2.1 s per rollout against 0.6 s for all 8 in one.
- rewards: the answers are gathered (token ids; every process re-encodes the step's prompts), the
  main process alone scores the whole step (the judge's verdict cache, rate limits and a reward
  model are used by one process) and broadcasts the scores. Every process then holds the whole
  rollout batch, so the reward statistics, KL penalty, GAE and advantage whitening are those of
  the global batch, the same in every process.
- forward: each process computes the rollout's log-probs, values and reference log-probs for its
  own answers; they are all-gathered.
- update: the minibatches are global (one seeded shuffle of the global batch); process r trains on
  slice r of each and its losses are sums over its tokens divided by the minibatch's global token
  count, so DDP's all-reduce (of the loss × N, which its mean divides back out) gives the
  1-process gradient. A minibatch must hold at least N answers (a clear error otherwise).
- resume: the run key holds the global batch (prompts_per_step × N), not the split: `train_ppo`
  called directly resumes with another process count when the global batch is unchanged (by
  construction; untested); another global batch starts over. Under `alignkit run` the train stage's fingerprint holds `launch.num_processes`, so
  there a change of process count starts the stage over (as for DPO); a killed run re-run with
  the same count resumes. Checkpoints hold the whole state; only the main process writes metrics,
  checkpoints and the adapter.
- vLLM rollouts beside the trainer (`ppo.rollout: vllm`) run in one process only (a `RecipeError`
  under N > 1): an engine per trainer process would need each engine pinned to its process's GPU
  and the trainer's memory left free (`sample.vllm.gpu_memory_utilization` or `kv_cache_memory`),
  which is not built or tested yet. A vLLM server on GPUs of its own (`ppo.rollout: vllm_server`,
  `alignkit.train.vllm_server`) serves any number of processes: the main process loads each
  step's adapter into it, and every process sends its own prompts.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from alignkit.console import progress
from alignkit.errors import ModelError, RecipeError, StageInputError, finite
from alignkit.models.inputs import collate, encode, extend, placeholder_ids
from alignkit.models.lengths import CONTEXT, Overlong, context_length, example_length, over_limit, write_skipped
from alignkit.records import Prompt, Sample, atomic_output
from alignkit.sample.base import Generation, Request, derive_seed
from alignkit.sample.config import SampleConfig
from alignkit.tracking import StepLog, Tracking
from alignkit.train.config import VLLM_SERVER_PLACEMENT, PpoConfig, TrainConfig

# ---------------------------------------------------------------------------------------------
# math on [answers, response tokens] grids; `mask` is 1 on real response tokens, 0 on padding


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the masked entries; with `count`, their sum / count (this process's share of
    a mean over a minibatch split between processes)."""
    return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


class RunningMeanStd:
    """Running mean and variance of every score seen so far (Chan et al.'s parallel update, as cleanrl)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor, clip: float) -> torch.Tensor:
        z = (x - self.mean) / (self.var + 1e-8) ** 0.5
        return z.clamp(-clip, clip) if clip > 0 else z


def kl_penalised_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·(log π − log π_ref), plus each answer's score on its final token; and the per-token KL."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(γ, λ); an answer ends (V = 0 after it) at its last masked token."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, max(−A·r, −A·clip(r, 1−ε, 1+ε)) per token; plus clip fraction and approx KL.
    Means are over `mask`, or sums / `count` (see `masked_mean`)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    loss = masked_mean(surrogate, mask, count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask, count).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask, count).item(),  # Schulman's unbiased k3 estimator
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """½·max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, ±ε_v); mean as `masked_mean`."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, count)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over response tokens: 1 is a perfect value function, ≤ 0 a useless one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float("nan") if var_returns == 0 else (1 - var_residual / var_returns).item()


class AdaptiveKL:
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after each batch of n answers."""

    def __init__(self, kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n / self.horizon


# ---------------------------------------------------------------------------------------------
# models: the value head, and the forward pass on response tokens


class ValueHead(nn.Module):
    """V(s_t) for every response token: a linear layer on last hidden states, the policy's or its own backbone's."""

    def __init__(self, hidden_size: int, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone  # None: the policy's hidden states (shared)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # V = 0 at the start: no made-up baseline
        nn.init.zeros_(self.head.bias)

    def forward(self, policy_hidden: torch.Tensor, inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        hidden = policy_hidden if self.backbone is None else response_hidden(_lm(self.backbone), inputs, idx)
        return self.head(hidden.float()).squeeze(-1)


def _lm(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (adapters are injected in place, so they still run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_hidden(lm: nn.Module, inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Last hidden states at positions `idx` [B, W]: position p predicts token p + 1."""
    hidden = lm.model(**inputs).last_hidden_state
    return hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


def token_logps(
    lm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the entropy at each position, at the rollout temperature (the distribution
    the tokens were drawn from); the LM head runs on response positions only."""
    logits = lm.get_output_embeddings()(hidden).float() / max(temperature, 1e-7)
    logps = torch.log_softmax(logits, dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logps.gather(-1, targets[..., None]).squeeze(-1), entropy


# ---------------------------------------------------------------------------------------------
# rollout engines


class RolloutEngine(Protocol):
    """Samples answers from the current policy; `sync` hands it the policy's weights before each batch.
    `group`: prompts per `generate` call, at fixed places of a step's global batch, for an engine
    whose answers depend on the whole call; None for one that seeds each request by its id."""

    group: int | None

    def sync(self, policy: nn.Module, step: int) -> None: ...

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]: ...


class TransformersRollouts:
    """`generate` on the policy being trained: always current, nothing to copy; `batch_size` prompts a call."""

    def __init__(self, policy: nn.Module, processor: Any, batch_size: int, **settings: Any):
        from alignkit.sample.transformers_backend import TransformersBackend

        self.group = batch_size
        settings["batch_size"] = batch_size
        self.backend = TransformersBackend.in_process(policy, processor, "ppo-policy", **settings)

    def sync(self, policy: nn.Module, step: int) -> None:
        pass

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        return self.backend.generate(requests, num_samples, seed)


class VllmRollouts:
    """A vLLM engine on the base model; before each batch the current LoRA adapter is saved and loaded."""

    group = None  # vLLM seeds each request by its id: a process's prompts go in one call

    def __init__(self, model_path: str, policy: nn.Module, adapter_dir: Path, vllm_options: dict | None, **settings):
        from alignkit.sample.vllm_backend import lora_problem, make_vllm_backend

        if not hasattr(policy, "peft_config"):
            raise RecipeError("ppo.rollout: rollout engine 'vllm' needs LoRA (train.finetune: lora): it loads the adapter each step")
        self.dir = adapter_dir
        adapter = str(self._save(policy, 0))
        if problem := lora_problem(adapter):
            raise ModelError(f"rollout engine 'vllm' loads the policy's LoRA adapter into vLLM each step, and vLLM "
                             f"cannot apply this one: {problem}. Use rollout engine 'transformers'.")  # fmt: skip
        self.backend = make_vllm_backend(model_path, adapter, options=vllm_options, **settings)

    def _save(self, policy: nn.Module, step: int) -> Path:
        return save_rollout_adapter(policy, self.dir, step)

    def sync(self, policy: nn.Module, step: int) -> None:
        self.backend.use_adapter(str(self._save(policy, step)))

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        """The answers; a prompt the engine refuses (prompts over its max_model_len are left out up
        front: `fitting_prompts`) stops the run with vLLM's reason and the prompt's id."""
        from alignkit.sample.base import RejectedPrompts

        try:
            return self.backend.generate(requests, num_samples, seed)
        except RejectedPrompts as e:
            listed = "; ".join(f"prompt {rid}: {reason}" for rid, reason in e.errors.items())
            raise StageInputError(f"ppo.rollout vllm: the vLLM engine refused {len(e.errors)} prompt(s): {listed}") from None


def save_rollout_adapter(policy: nn.Module, adapter_dir: Path, step: int) -> Path:
    """The policy's LoRA adapter as `adapter_dir/step-N`, the only one there: the engine has loaded
    the previous step's adapter, which is removed."""
    shutil.rmtree(adapter_dir, ignore_errors=True)
    path = adapter_dir / f"step-{step}"
    policy.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# a rollout batch


@dataclass
class Batch:
    """One rollout batch: per-answer encodings (prompt + sampled tokens) and [N, W] response grids."""

    features: list[dict[str, torch.Tensor]]  # per answer, for `alignkit.models.inputs.collate`
    starts: torch.Tensor  # [N] prompt length: the first response token's position
    targets: torch.Tensor  # [N, W] sampled token ids, left-aligned
    mask: torch.Tensor  # [N, W]
    samples: list[Sample]
    prompts: list[Prompt]

    def positions(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """[rows, W] positions whose hidden state predicts each response token (clamped inside the rows' width)."""
        return (self.starts[rows, None] - 1 + torch.arange(self.targets.shape[1])).clamp(max=width - 1)


def answer_tokens(token_ids: list[int], placeholders: frozenset[int], eos_id: int) -> list[int]:
    """A sampled answer's tokens up to the first of `placeholders` (see `collect`); an answer cut to
    nothing is the end-of-sequence token alone (an empty answer still ends)."""
    cut = next((i for i, t in enumerate(token_ids) if t in placeholders), len(token_ids))
    return token_ids[:cut] or [eos_id]


def collect(
    engine: RolloutEngine,
    processor: Any,
    prompts: list[Prompt],
    template: Any,
    k: int,
    seed: int,
    share: slice = slice(None),
    gather: Callable[[list], list] = lambda x: x,
    placeholders: frozenset[int] = frozenset(),
) -> Batch:
    """# rollout: K answers per prompt of the step's global batch `prompts`, as records (for the
    rewards) and token grids (for training). This process samples the prompts of `share`; `gather`
    collects every process's answers in process order (accelerate's `gather_object` under a launch).
    A sampled answer is cut before the first of `placeholders` (`alignkit.models.inputs.placeholder_ids`
    of the policy: the ids the model fills with image features), which the model would read as an
    image slot without pixels; it is trained on up to that token only."""
    from alignkit.sample import to_request, to_samples

    # A request's id is its prompt's place in the step (vLLM seeds a request by it); the engine's
    # groups sit at fixed places of the global batch, each seeded by its index (see the module docstring).
    requests = [replace(to_request(p, template), prompt_id=f"{j}:{p.prompt_id}") for j, p in enumerate(prompts)]
    lo, hi, _ = share.indices(len(prompts))
    size, generations = engine.group or len(prompts), []
    for g in range(lo // size, (hi - 1) // size + 1):  # the groups this process's share touches
        generations += engine.generate(requests[max(lo, g * size) : min(hi, (g + 1) * size)], k, derive_seed(seed, g))
    generations = gather(generations)
    features, samples, rows, out_prompts = [], [], [], []
    for prompt, request, gens in zip(prompts, requests, generations, strict=True):
        encoded = encode(processor, request.messages, request.images)
        for sample, gen in zip(to_samples(prompt.prompt_id, gens, template, "ppo", False), gens):
            tokens = answer_tokens(gen.token_ids, placeholders, processor.tokenizer.eos_token_id)
            features.append(extend(encoded, tokens))
            rows.append(tokens)
            samples.append(sample)
            out_prompts.append(prompt)
    width = max(len(r) for r in rows)
    targets = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])
    starts = torch.tensor([len(f["input_ids"]) - len(r) for f, r in zip(features, rows)])
    return Batch(features, starts, targets, mask, samples, out_prompts)


def evaluate(
    policy: nn.Module, value: ValueHead | None, batch: Batch, rows: torch.Tensor, pad_id: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """# forward: log π of the sampled tokens, entropy and values (if `value`) for the batch's `rows`,
    on the device the policy's weights are on."""
    rows = rows.cpu()  # DDP moves a forward's tensor arguments to the GPU; the batch stays where it is
    device = next(policy.parameters()).device
    inputs = collate([batch.features[i] for i in rows.tolist()], pad_id)
    inputs.pop("labels")  # the loss is PPO's, on `batch.targets`
    idx = batch.positions(rows, inputs["input_ids"].shape[1]).to(device)
    inputs = {key: v.to(device) for key, v in inputs.items()}
    hidden = response_hidden(_lm(policy), inputs, idx)
    logp, entropy = token_logps(_lm(policy), hidden, batch.targets[rows].to(device), temperature)
    return logp, entropy, None if value is None else value(hidden, inputs, idx)


class PpoModel(nn.Module):
    """The policy and its value head (None: the reference) as one module, so that accelerate places
    both, runs their forward in its mixed precision, and DDP all-reduces both one's gradients."""

    def __init__(self, policy: nn.Module, value: ValueHead | None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, batch: Batch, rows: torch.Tensor, pad_id: int, temperature: float, values: bool = True):
        return evaluate(self.policy, self.value if values else None, batch, rows, pad_id, temperature)


# ---------------------------------------------------------------------------------------------
# the training loop


UPDATE_LOGS = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")  # means over a step's minibatches


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(random.Random(derive_seed(seed, "prompts", epoch)).sample(range(n), n))


def step_prompts(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompt indices of a step: consecutive slices of one seeded shuffle per pass over the prompts."""
    return [_epoch_order(n, seed, j // n)[j % n] for j in range(step * per_step, (step + 1) * per_step)]


def check_minibatches(answers: int, num_minibatches: int, world: int) -> int:
    """The minibatch size of a rollout batch of `answers`; every minibatch must give each of the
    `world` processes at least one answer to train on."""
    size = max(1, answers // num_minibatches)
    if size < world or 0 < answers % size < world:
        raise RecipeError(f"ppo.num_minibatches={num_minibatches}: a rollout batch of {answers} answers splits into "
                          f"minibatches of {size} (the last of {answers % size or size}), fewer than the "
                          f"{world} processes (launch.num_processes); lower ppo.num_minibatches or raise "
                          f"ppo.prompts_per_step")  # fmt: skip
    return size


def fitting_prompts(
    prompts: Sequence[Prompt], processor: Any, config: Any, template: Any, max_new_tokens: int, overlong: Overlong,
    engine_limit: int | None = None,
) -> tuple[list[Prompt], set[str]]:
    """The prompts whose request (image tokens counted) plus `max_new_tokens` fits the model's context
    and `engine_limit` (the max_model_len of the vLLM engine alignkit starts for rollouts: `rollout_limit`),
    and the ids of those left out under `overlong: skip`; under `stop` a `StageInputError` names them."""
    from alignkit.sample import to_request

    lengths = []
    for p in prompts:
        request = to_request(p, template)
        ids = encode(processor, request.messages, request.images)["input_ids"]
        lengths.append(example_length(p.prompt_id, ids, config, max_new_tokens))
    limit, what = context_length(config), CONTEXT
    if engine_limit is not None and (limit is None or engine_limit < limit):
        limit, what = engine_limit, "the rollout engine's sample.vllm.max_model_len"
    skipped = over_limit(lengths, limit, overlong, f"{what}, with sample.max_new_tokens")
    return [p for p in prompts if p.prompt_id not in skipped], skipped


def rollout_limit(rollout: str, server_url: str | None, engine_options: dict[str, Any]) -> int | None:
    """The max_model_len a rollout must fit besides the model's context: that of the vLLM engine or
    server alignkit starts; None for transformers rollouts and for a server at `url`, which keeps
    its own limit (a prompt over it stops the run with the server's reason)."""
    if rollout == "vllm" or (rollout == "vllm_server" and server_url is None):
        return engine_options.get("max_model_len")
    return None


def train_ppo(
    prompts: Sequence[Prompt],
    out_dir: Path,
    cfg: PpoConfig = PpoConfig(),
    *,
    model: str,
    reward: Any,
    sample: SampleConfig = SampleConfig(),
    train: TrainConfig = TrainConfig(method="ppo"),
    seed: int = 0,
    engine_options: dict | None = None,
    tracking: Tracking | None = None,
) -> Path:
    """Train `model` with PPO on `prompts`; returns `out_dir/adapter` (LoRA) or `out_dir/model` (full).

    `cfg` is the `ppo` section; answers are sampled as `sample` says (K, length, temperature, top_p,
    template, vLLM engine), and `train` gives the learning rate, `finetune` (lora or full), LoRA and
    checkpoint interval. `reward` is an `alignkit.train.rewards.RewardFn` (or any callable
    `(prompts, samples) -> list[float]` with a `name`); only the main process calls it (the others
    may pass None). The `train` section's precision, attention and gradient-checkpointing keys apply
    (`alignkit.models.device.ComputeSettings`).
    `cfg.rollout` picks the engine: the policy itself through transformers, or vLLM with the
    current adapter loaded every step (LoRA; in this process, or a server: `cfg.vllm_server`,
    which a stage that starts it stops when it ends or fails); `engine_options` adds vLLM engine
    arguments beyond `sample.vllm` (tests run it in-process); `tracking` is the tracker run the
    steps also go to. A prompt whose request plus `sample.max_new_tokens` exceeds the model's
    context stops the run or is left out (`train.overlong`; the ids go to `out_dir/overlong.json`).
    Run it in every process of a launch (see the module docstring); it returns when all are done.
    """
    with ExitStack() as stack:
        return _train_ppo(prompts, out_dir, cfg, model, reward, sample, train, seed, engine_options, tracking, stack)


def _train_ppo(prompts: Sequence[Prompt], out_dir: Path, cfg: PpoConfig, model: str, reward: Any,
               sample: SampleConfig, train: TrainConfig, seed: int, engine_options: dict | None,
               tracking: Tracking | None, stack: ExitStack) -> Path:  # fmt: skip
    """`train_ppo`; what must be cleaned up when it returns or fails (a started vLLM server) goes on `stack`."""
    from accelerate.utils import broadcast_object_list, gather_object

    from alignkit.models import load_policy, lora_config, resolve_model
    from alignkit.models.checkpoint import load_checkpoint, resume_point, save_checkpoint
    from alignkit.models.device import ComputeSettings, make_accelerator
    from alignkit.sample.templates import load_template

    c, t = cfg, train
    out_dir = Path(out_dir)
    compute = ComputeSettings.of(t)
    accelerator = make_accelerator(compute, loop="PPO")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if c.rollout == "vllm" and world > 1:
        raise RecipeError(f"ppo.rollout: vllm runs in one process, not launch.num_processes={world}: use "
                          "ppo.rollout=transformers, or launch.num_processes=1")  # fmt: skip
    if c.rollout == "vllm_server" and t.finetune != "lora":
        raise RecipeError(f"ppo.rollout: vllm_server needs train.finetune lora, not {t.finetune}: it loads the "
                          "policy's LoRA adapter into the server each step")  # fmt: skip
    global_prompts = c.prompts_per_step * world
    n = global_prompts * sample.num_samples  # answers per step, over all processes
    minibatch = check_minibatches(n, c.num_minibatches, world)
    mine = torch.arange(rank * n // world, (rank + 1) * n // world)  # this process's answers of a step
    model_path = resolve_model(model)
    tmpl = load_template(sample.template)
    torch.manual_seed(seed)  # the same LoRA initialisation in every process and every split
    vllm_options = sample.vllm.model_dump(exclude_none=True) | (engine_options or {})
    if c.rollout == "vllm_server":  # started first: the server loads the model while the trainer does
        from alignkit.train.vllm_server import serve

        server, root, session = serve(stack, c.vllm_server, "ppo", model_path, vllm_options, t.lora_r,
                                      out_dir / "vllm_server.log", main)  # fmt: skip

    # set-up: policy (+ LoRA), reference, value head, optimizer, rollout engine; float32 weights,
    # placed by accelerate, which also runs the forward passes in its mixed precision
    policy, processor = load_policy(model_path, dtype=torch.float32, **compute.load_options())
    limit = rollout_limit(c.rollout, c.vllm_server.url, vllm_options)
    prompts, skipped = fitting_prompts(prompts, processor, policy.config, tmpl, sample.max_new_tokens, t.overlong, limit)
    if main:
        write_skipped(out_dir, skipped)
    pad_id = processor.tokenizer.pad_token_id
    reference = None
    lora = lora_config(t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules, model=policy)
    placeholders = frozenset(placeholder_ids(policy.config))
    if t.finetune == "lora":
        from peft import get_peft_model

        policy = get_peft_model(policy, lora)
    else:  # full fine-tuning: the one case that needs a frozen copy
        frozen = copy.deepcopy(policy).eval().requires_grad_(False)
        reference = accelerator.prepare_model(PpoModel(frozen, None), evaluation_mode=True)
    hidden_size = _lm(policy).config.get_text_config().hidden_size
    critic_backbone = None
    if c.value_model == "separate":
        critic_backbone, _ = load_policy(model_path, dtype=torch.float32, **compute.load_options())
        if t.finetune == "lora":
            from peft import get_peft_model

            critic_backbone = get_peft_model(critic_backbone, lora)
        compute.for_training(critic_backbone)
    compute.for_training(policy)  # after the reference copy: only the trained model recomputes activations
    value = ValueHead(hidden_size, critic_backbone)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, eps=1e-5)  # cleanrl's eps
    wrapped, optimizer = accelerator.prepare(PpoModel(policy, value), optimizer)
    ppo_model = accelerator.unwrap_model(wrapped)  # forward passes without gradients skip DDP
    reward_stats, kl_ctl = RunningMeanStd(), AdaptiveKL(c.kl_coef, c.target_kl, c.kl_horizon)
    sampling = dict(max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_p=sample.top_p)
    if c.rollout == "vllm":
        engine: RolloutEngine = VllmRollouts(model_path, policy, out_dir / "rollout_adapter", vllm_options, **sampling)
    elif c.rollout == "vllm_server":
        from alignkit.train.vllm_server import ServerRollouts

        engine = ServerRollouts(root, session, processor, out_dir / "rollout_adapter", main=main,
                                barrier=accelerator.wait_for_everyone, server=server, cfg=c.vllm_server,
                                sample=sample, save=save_rollout_adapter, section="ppo")  # fmt: skip
    else:
        engine = TransformersRollouts(policy, processor, sample.batch_size, **sampling)

    # resume: the last complete checkpoint of a run with these settings (more steps extend a run),
    # decided by the main process; the global batch counts, not its split between processes
    config = c.model_dump(mode="json", exclude={"steps": True, "rewards": True, "vllm_server": VLLM_SERVER_PLACEMENT})
    config |= {"prompts_per_step": global_prompts}
    settings = {"config": config, "model": model_path, "seed": seed,
                "sample": sample.model_dump(include={"num_samples", "max_new_tokens", "temperature", "top_p", "template",
                                                     "batch_size"}),
                "train": t.model_dump(include={"learning_rate", "finetune", "lora_r", "lora_alpha", "lora_dropout",
                                               "target_modules"}),
                "reward": getattr(reward, "name", repr(reward)), "prompts": [p.prompt_id for p in prompts],
                "compute": [compute.precision(), compute.attn_implementation]}  # fmt: skip
    start = 0
    box = [resume_point(out_dir, settings) if main else None]
    broadcast_object_list(box)
    if (last := box[0]) is not None:
        start, extra = load_checkpoint(last, modules={"policy": policy, "value": value}, optimizer=optimizer)
        reward_stats.__dict__.update(extra["reward_stats"])
        kl_ctl.value = extra["kl_coef"]
    log = StepLog(out_dir / "metrics.jsonl", tracking) if main else None

    bar = progress(range(start, c.steps), initial=start, total=c.steps, desc="ppo", disable=not main)
    for step in bar:
        started = time.monotonic()

        # rollout: this process's share of the step's prompts; every process gets the whole batch
        ppo_model.eval()  # a separate critic has (LoRA) dropout too: none in the rollout's values
        engine.sync(policy, step)
        chosen = [prompts[i] for i in step_prompts(len(prompts), global_prompts, step, seed)]
        share = slice(rank * c.prompts_per_step, (rank + 1) * c.prompts_per_step)
        with accelerator.autocast():
            batch = collect(engine, processor, chosen, tmpl, sample.num_samples, derive_seed(seed, "rollout", step),
                            share, gather_object, placeholders)  # fmt: skip
        mask = batch.mask.to(accelerator.device)
        rollout_seconds = time.monotonic() - started

        # rewards: the main process scores the whole batch; then running mean/std scaling and clipping
        box = [(reward(batch.prompts, batch.samples), getattr(reward, "failures", 0)) if main else None]
        broadcast_object_list(box)
        raw, failures = torch.tensor(box[0][0], dtype=torch.float32, device=accelerator.device), box[0][1]
        if c.normalize_rewards:
            reward_stats.update(raw)
            scores = reward_stats.normalize(raw, c.reward_clip)
        else:
            scores = raw.clamp(-c.reward_clip, c.reward_clip) if c.reward_clip > 0 else raw

        # forward: old log-probs and values under the rollout policy, reference log-probs, for this
        # process's answers, then gathered
        temp = sample.temperature
        chunks = mine.split(minibatch)
        with torch.no_grad():
            old = [ppo_model(batch, rows, pad_id, temp) for rows in chunks]
            old_logp, old_values = torch.cat([o[0] for o in old]), torch.cat([o[2] for o in old])
            if reference is None:
                with policy.disable_adapter():
                    ref_logp = torch.cat([ppo_model(batch, rows, pad_id, temp, values=False)[0] for rows in chunks])
            else:
                ref_logp = torch.cat([reference(batch, rows, pad_id, temp)[0] for rows in chunks])
            old_logp, old_values, ref_logp = accelerator.gather((old_logp, old_values, ref_logp))

        # kl penalty: per-token -β·KL, the scaled score on the final token
        rewards, kl = kl_penalised_rewards(old_logp, ref_logp, scores, mask, kl_ctl.value)

        # advantages
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # update: ppo_epochs passes over shuffled global minibatches, this process training on its slice of each
        wrapped.train()
        generator = torch.Generator().manual_seed(derive_seed(seed, "minibatches", step))
        logs = torch.zeros(len(UPDATE_LOGS), dtype=torch.float64)  # sums over the minibatches
        for _ in range(c.ppo_epochs):
            for rows in torch.randperm(n, generator=generator).split(minibatch):
                count, rows = mask[rows].sum(), rows.tensor_split(world)[rank]
                m = mask[rows]
                logp, entropy, values = wrapped(batch, rows, pad_id, temp)

                # policy loss
                pg_loss, stats = policy_loss(logp, old_logp[rows], advantages[rows], m, c.clip_range, count)

                # value loss
                vf_loss = value_loss(values, old_values[rows], returns[rows], m, c.clip_range_value, count)

                entropy_mean = masked_mean(entropy, m, count)
                loss = pg_loss + c.vf_coef * vf_loss - c.ent_coef * entropy_mean
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss * world)  # DDP averages over processes; we want their sum
                parts = torch.tensor([loss.item(), pg_loss.item(), vf_loss.item(), entropy_mean.item(),
                                      stats["clipfrac"], stats["approx_kl"]], device=accelerator.device)  # fmt: skip
                parts = accelerator.reduce(parts, "sum").cpu()  # the minibatch's means, the same in every process
                finite(parts[0].item(), f"ppo step {step + 1}: the loss")
                accelerator.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                logs += parts[1:].double()
        updates = c.ppo_epochs * len(range(0, n, minibatch))

        # kl control: per-answer KL to the reference, summed over its tokens
        kl_per_answer = kl.sum(1).mean().item()
        kl_used = kl_ctl.value
        kl_ctl.update(kl_per_answer, n)

        # log
        if main:
            record = {
                "step": step + 1,
                "reward/raw": raw.mean().item(),
                "reward/scaled": scores.mean().item(),
                "reward/failures": failures,
                "kl": kl_per_answer,
                "kl_coef": kl_used,
                **dict(zip(UPDATE_LOGS, (logs / updates).tolist())),
                "explained_variance": explained_variance(old_values, returns, mask),
                "response_length": mask.sum(1).mean().item(),
                "rollout_seconds": round(rollout_seconds, 3),
                "step_seconds": round(time.monotonic() - started, 3),
            }
            log.write(record)
            bar.set_postfix(reward=f"{record['reward/raw']:.3f}", kl=f"{record['kl']:.3f}")

        # checkpoint
        if (step + 1) % t.save_steps == 0 and step + 1 < c.steps:
            if main:
                extra = {"reward_stats": dict(reward_stats.__dict__), "kl_coef": kl_ctl.value}
                save_checkpoint(out_dir / "checkpoints", step + 1, modules={"policy": policy, "value": value},
                                optimizer=optimizer, extra=extra, export=policy.save_pretrained)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()
    if log:
        log.close()

    # save: the adapter (or model) with the processor, via a temporary name
    final = out_dir / ("adapter" if t.finetune == "lora" else "model")
    accelerator.wait_for_everyone()
    if main:
        with atomic_output(final) as tmp:
            policy.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        shutil.rmtree(out_dir / "rollout_adapter", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
