"""The recipe: one YAML file parsed once into typed sections, with `section.key=value` overrides.

Errors name the key, the file and (when the key is in the file) its line. Secrets never live in a
recipe: API keys are read from the environment variable the recipe names (`judge.api_key_env`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from alignkit.config import Section
from alignkit.errors import RecipeError

STAGES = ("sft", "prompts", "sample", "judge", "pairs", "reward_model", "score", "train", "eval")
# The critique reward model stages are opt-in: list them in a recipe's `stages` to run them.
DEFAULT_STAGES = ("prompts", "sample", "judge", "pairs", "train")


class PolicyConfig(Section):
    model: str = "tiny:qwen2-vl"
    """Hub id, local path, or a tiny model built offline: `tiny:qwen2-vl`, `tiny:llava`."""
    adapter: str | None = None
    """A PEFT adapter directory to sample from (e.g. the previous round's checkpoint)."""


class SyntheticConfig(Section):
    world: Literal["shapes"] = "shapes"
    num_prompts: int = Field(16, ge=1)
    seed: int = 0
    tasks: list[Literal["describe", "count", "exists", "color"]] = ["describe", "count", "exists", "color"]


class DataConfig(Section):
    prompts: str | None = None
    """Prompts as jsonl, parquet, or a saved `datasets` directory (relative to the recipe file)."""
    synthetic: SyntheticConfig | None = None
    """Generate prompts from the synthetic shapes world instead (offline, deterministic)."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.prompts is None) == (self.synthetic is None):
            raise ValueError("set exactly one of data.prompts or data.synthetic")
        return self


class VllmConfig(Section):
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """On GPU the share of GPU memory (vLLM's default 0.9); on CPU the share of host RAM kept for the
    KV cache (default 0.1: vLLM's 0.9 fails at start-up there)."""
    enforce_eager: bool | None = None
    """Skip graph compilation (default: on for CPU, where compiling costs ~90 s per engine start)."""
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    """Independent engines, one per process and `tensor_parallel_size` GPUs (on CPU: a share of the
    cores); each call's prompts are split between them. Samples do not depend on it."""
    dtype: str = "auto"
    max_model_len: int | None = 2048


class SampleConfig(Section):
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    """`vllm` (in-process engine), `transformers` (generate), or `openai` (any OpenAI-compatible server)."""
    num_samples: int = Field(4, ge=1)
    """K answers per prompt."""
    drop_duplicates: bool = False
    """Leave out exact repeats of a prompt's earlier samples (identical answers make useless pairs);
    they are counted either way, and kept samples keep their ids."""
    base_url: str | None = None
    """openai: the server's URL, e.g. http://127.0.0.1:8000/v1 for `vllm serve` (null: OpenAI's)."""
    model_name: str | None = None
    """openai: the model name the server serves (default: policy.model); with policy.adapter, the
    name the server serves the adapter under (`vllm serve BASE --enable-lora --lora-modules NAME=DIR`)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: name of the environment variable holding the API key (the key itself never goes here)."""
    concurrency: int = Field(8, ge=1)
    """openai: requests in flight at once (one per prompt, each asking for K answers)."""
    logprobs: bool = False
    """openai: ask for per-token logprobs so that each of a prompt's K answers gets its exact token
    count (a reply's usage counts them together, so without this they are estimated). Off by
    default: not every OpenAI-compatible server returns them (`vllm serve` does)."""
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    template: str = "cot"
    """Chain-of-thought template: `cot`, `think`, `plain`, or a template YAML file."""
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(16, ge=1)
    """Prompts per chunk written to disk; a killed run resumes from the last finished chunk."""
    vllm: VllmConfig = VllmConfig()


class JudgeConfig(Section):
    backend: Literal["reference", "openai"] = "reference"
    """`reference` scores against the prompts' gold annotations; `openai` calls an LLM judge."""
    rubric: str = "overall"
    """A built-in judge in judges/ (`overall`, `hallucination`, `correctness`, `claims`, `pairwise`) or a YAML path."""
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes here)."""
    concurrency: int = Field(8, ge=1)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    image_max_side: int = Field(512, ge=16)
    rpm: float | None = Field(None, gt=0)
    """Cap on judge requests per minute (starts spaced evenly); null: no cap."""
    tpm: float | None = Field(None, gt=0)
    """Cap on judge tokens per minute (estimated before sending, corrected by the reply); null: no cap."""
    num_judgments: int = Field(1, ge=1)
    """Judgments per sample; > 1 averages them (self-consistency) and reports their agreement."""

    @model_validator(mode="after")
    def _openai_needs_model(self) -> "JudgeConfig":
        if self.backend == "openai" and not self.model:
            raise ValueError("judge.model is required when judge.backend is 'openai'")
        return self


class PairsConfig(Section):
    strategy: Literal["best_worst", "threshold"] = "best_worst"
    min_margin: float = Field(0.0, ge=0)


class TrainConfig(Section):
    method: Literal["dpo", "mmdpo", "ppo"] = "dpo"
    """`dpo` (TRL's DPO), `mmdpo` (MM-RLHF: a per-pair beta from the reward margin, cached reference) or
    `ppo` (online RL on the prompts with the `ppo` section's rewards; uses learning_rate, finetune
    (lora or full), lora_*, target_modules and save_steps from here)."""
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
    save_steps: int = Field(50, ge=1)


class RewardModelConfig(Section):
    """The critique reward model (MM-RLHF): stage `reward_model` trains it, stage `score` uses it."""

    model: str | None = None
    """Backbone VLM to train from (default: policy.model)."""
    finetune: Literal["lora", "full"] = "lora"
    learning_rate: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    """Pairs per step (each pair is two sequences)."""
    critique_weight: float = Field(1.0, ge=0)
    """Weight of the critique token cross-entropy."""
    margin_weight: float = Field(0.0, ge=0)
    """Bradley-Terry margin: -log sigmoid(r_c - r_r - margin_weight * judge margin); 0 is plain BT."""
    tie_weight: float = Field(1.0, ge=0)
    """Weight of (r_c - r_r)^2 on tied pairs (margin 0)."""
    center_weight: float = Field(0.01, ge=0)
    """Reward centering, center_weight * mean((r_c + r_r)^2); 0.01 as in the MM-RLHF recipe."""
    use_critiques: bool = True
    """Train critique generation on the judge's rationales; false trains the score only."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of prompts held out to report ACC / ACC+ after training."""
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    num_critiques: int = Field(1, ge=0)
    """Critiques per answer when scoring (1: greedy; more: sampled and averaged; 0: no critique)."""
    max_critique_tokens: int = Field(64, ge=1)
    critique_temperature: float = Field(1.0, gt=0)
    score_batch_size: int = Field(8, ge=1)
    checkpoint: str | None = None
    """Score with this reward model directory instead of the one the `reward_model` stage trains."""


class SftSyntheticConfig(Section):
    world: Literal["shapes"] = "shapes"
    num_examples: int = Field(2048, ge=1)
    seed: int = 1
    """Seed of the SFT images (keep it apart from data.synthetic.seed and eval's)."""
    error_rate: float = Field(0.6, ge=0, le=1)
    """Share of SFT answers that hallucinate one object that is not in the image (see
    `testing.shapes.perceived_answer`); above 0.5 the greedy base policy hallucinates."""


class SftConfig(Section):
    """Supervised fine-tuning before preference training; its model becomes the policy."""

    data: str | None = None
    """SFT examples as jsonl: TRL prompt-completion conversations plus `images` (relative paths)."""
    synthetic: SftSyntheticConfig | None = None
    """Or SFT data from the synthetic shapes world, answers in the sampling template's format."""
    finetune: Literal["full", "lora"] = "full"
    learning_rate: float = Field(1e-3, gt=0)
    """1e-3 trains the tiny model from scratch; use ~1e-4 with LoRA on a pretrained VLM."""
    max_steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=1)
    warmup_steps: int = Field(50, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    save_steps: int = Field(250, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "SftConfig":
        if (self.data is None) == (self.synthetic is None):
            raise ValueError("set exactly one of sft.data or sft.synthetic")
        return self


class EvalConfig(Section):
    """Held-out evaluation of the policy before alignment and after every round."""

    prompts: str | None = None
    """Held-out prompts with gold annotations (jsonl, parquet or a `datasets` directory)."""
    synthetic: SyntheticConfig | None = None
    """Or held-out prompts from the synthetic world (use a seed no training data uses)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding (the default, as in CHAIR and POPE); above 0 samples."""
    batch_size: int = Field(16, ge=1)
    judge: bool = True
    """Also report the mean score of the recipe's judge on the answers."""

    @model_validator(mode="after")
    def _one_source(self) -> "EvalConfig":
        if (self.prompts is None) == (self.synthetic is None):
            raise ValueError("set exactly one of eval.prompts or eval.synthetic")
        return self


class RewardSpec(Section):
    """One reward source of PPO; several are summed with their weights."""

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


class PpoConfig(Section):
    """PPO (train.method: ppo). Answers are sampled as the `sample` section says (num_samples,
    max_new_tokens, temperature, top_p, template, vllm); the hyperparameters' defaults and the
    reasons for them are documented on `alignkit.train.ppo.PPOConfig`."""

    rollout: Literal["transformers", "vllm"] = "transformers"
    """Rollout engine: `transformers` generates with the policy in training; `vllm` loads the current
    LoRA adapter into a vLLM engine before every rollout batch (LoRA only)."""
    rewards: list[RewardSpec] = [RewardSpec()]
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(4, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    whiten_advantages: bool = True
    kl_coef: float = Field(0.05, ge=0)
    """β of the per-token KL penalty to the reference (the starting β with target_kl)."""
    target_kl: float | None = Field(None, gt=0)
    """Set (e.g. 6.0) for Ziegler et al.'s adaptive KL controller; null keeps kl_coef fixed."""
    kl_horizon: int = Field(10000, ge=1)
    normalize_rewards: bool = True
    """Scale rewards by a running mean/std over all answers so far (on by default)."""
    reward_clip: float = Field(10.0, ge=0)
    """Clip normalised rewards to ± this (0: no clipping)."""
    value_model: Literal["shared", "separate"] = "shared"
    """`shared`: a value head on the policy's hidden states; `separate`: a second backbone with its own LoRA."""


class Recipe(Section):
    output_dir: str
    """Run directory (relative to the current directory)."""
    seed: int = 0
    stages: list[Literal[STAGES]] = list(DEFAULT_STAGES)
    policy: PolicyConfig = PolicyConfig()
    data: DataConfig
    sample: SampleConfig = SampleConfig()
    judge: JudgeConfig = JudgeConfig()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PpoConfig = PpoConfig()
    sft: SftConfig | None = None
    eval: EvalConfig | None = None
    rounds: int = Field(1, ge=1)
    """Rounds of sample -> judge -> pairs -> train; each round samples with the previous round's policy."""


DATA_PATH_KEYS = (("data", "prompts"), ("sft", "data"), ("eval", "prompts"))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise RecipeError(f"override {override!r}: expected section.key=value")
    dotted, value = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override {override!r}: expected section.key=value (an empty key)")
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {k!r} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {override!r}: the value is not valid YAML ({e})") from None


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _format_errors(err: ValidationError, source: str, key_lines: dict[str, int]) -> str:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        line = key_lines.get(key)
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
        out.append(f"{where}: {key or '(recipe)'}: {msg}")
    return "\n".join(out)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML file, apply overrides, and validate it into a `Recipe`."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what} (built-in recipes: `alignkit recipes`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe file ({e})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections")
    for o in overrides:
        apply_override(raw, o)
    # Relative data paths are relative to the recipe file, so a recipe runs from any directory.
    for section, key in DATA_PATH_KEYS:
        node = raw.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            node[key] = str((path.parent / value).resolve())
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        source = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
        raise RecipeError(_format_errors(e, source, _key_lines(text))) from None


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: Any) -> Any:
    """A copy of a resolved recipe with secrets removed (credentials embedded in URLs)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub("***@", value)
    return value


def resolved_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, secrets removed; saved in the run directory."""
    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
