"""The `sample` section: K answers per prompt, and the vLLM engine's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import Section


class VllmConfig(Section):
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """On GPU the share of GPU memory (vLLM's default 0.9); on CPU the share of host RAM kept for the
    KV cache (default 0.1: vLLM's 0.9 fails at start-up there)."""
    kv_cache_memory: float | None = Field(None, gt=0)
    """KV cache size in GiB (e.g. 0.25), the same on every machine; when set it wins over
    `gpu_memory_utilization`, and on CPU the engine starts whenever that much memory is free (a
    share of host RAM fails where other processes hold memory). Null: the share. On GPU vLLM still
    checks at start-up that `gpu_memory_utilization`'s share is free; on CPU vLLM's environment
    variable VLLM_CPU_KVCACHE_SPACE (whole GiB), if set, overrides this key."""
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
    timeout: float = Field(600.0, gt=0)
    """openai: seconds to wait for one reply."""
    max_retries: int = Field(3, ge=0)
    """openai: retries of a request that failed in transit (connection errors, 429, 5xx)."""
    rpm: float | None = Field(None, gt=0)
    """openai: cap on requests per minute; null: no cap."""
    tpm: float | None = Field(None, gt=0)
    """openai: cap on tokens per minute; null: no cap."""
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
