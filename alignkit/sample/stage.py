"""The `sample` stage: K chain-of-thought answers per prompt from this round's policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.records import Prompt, read_records
from alignkit.stage import Context, template_files

# The vLLM engine keys that cannot change an answer: how many engines, how much memory.
VLLM_UNCHANGING = frozenset({"sample.vllm.data_parallel_size", "sample.vllm.kv_cache_memory",
                             "sample.vllm.gpu_memory_utilization"})  # fmt: skip


class SampleStage:
    """Sample K chain-of-thought answers per prompt with vLLM, transformers or an OpenAI-compatible server."""

    name = command = "sample"
    per_round = True
    # Keys that cannot change the samples: changing them keeps the file. The engine's memory sizing is
    # among them: a shapes-rlaif run gave byte-identical samples with a 0.25 GiB KV cache and with
    # the default share of memory.
    exclude = frozenset({
        "sample.concurrency", "sample.api_key_env", "sample.timeout", "sample.max_retries", "sample.rpm", "sample.tpm",
        *VLLM_UNCHANGING,
    })  # fmt: skip

    def config(self, recipe) -> tuple[str, ...]:
        return ("sample", "policy.adapter", "seed")

    def reads(self, ctx: Context) -> list[Path]:
        return [ctx.paths.prompts, *template_files(ctx.config.sample.template)]

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {"policy": ctx.lineage.policy_identity(ctx.round)}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.samples

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.sample import run_sample

        return run_sample(
            read_records(ctx.paths.prompts, Prompt), ctx.paths.samples, ctx.config.sample, fingerprint=fingerprint,
            model=ctx.lineage.policy(ctx.round), adapter=ctx.config.policy.adapter, seed=ctx.config.seed,
        )  # fmt: skip
