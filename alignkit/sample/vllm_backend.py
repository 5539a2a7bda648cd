"""Sampling with a vLLM engine (GPU, or vLLM's CPU build).

Each prompt gets its own seed derived from the call's seed and its prompt id, so a prompt's
samples do not depend on which other prompts share the batch. On CPU, vLLM's
`gpu_memory_utilization` is the share of host RAM reserved for the KV cache; its default (0.92)
fails at start-up there, so the CPU default here is 0.1 (and eager mode, see `_engine_options`).
Code that creates this backend needs an `if __name__ == "__main__":` guard: vLLM starts its
workers with spawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.sample.base import Generation, Request, derive_seed, policy_name


def _engine_options(options: dict[str, Any] | None) -> dict[str, Any]:
    from vllm.platforms import current_platform

    defaults: dict[str, Any] = {"tensor_parallel_size": 1, "dtype": "auto", "max_model_len": None}
    if current_platform.is_cpu():
        # torch.compile added ~90 s to every engine start on a 2-core machine; CPU runs are small.
        # A seeded request whose prefill is split over steps fails on CPU in vLLM 0.32 ("CPU Generator
        # does not use offset" when the partial step's token is discarded): prefill whole prompts.
        defaults |= {"gpu_memory_utilization": 0.1, "enforce_eager": True, "enable_chunked_prefill": False}
    return defaults | (options or {})


class VllmBackend:
    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        options: dict[str, Any] | None = None,
    ):
        """`options` go to `vllm.LLM` (tensor_parallel_size, dtype, max_model_len, enforce_eager, ...)."""
        from transformers import AutoProcessor
        from vllm import LLM

        self.model, self.policy = model, policy_name(model, adapter)
        # The processor owns the multimodal chat template (tokenizers of hub VLMs may lack it).
        self.processor = AutoProcessor.from_pretrained(model)
        opts = _engine_options(options)
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            # vLLM accepts only some ranks (8, 16, 32, ...): round up to the next power of two.
            opts = {"enable_lora": True, "max_lora_rank": max(8, 1 << (rank - 1).bit_length())} | opts
            self.lora = LoRARequest("adapter", 1, str(adapter))
        try:
            self.llm = LLM(model=model, **opts)
        except Exception as e:
            what = f" with LoRA adapter {adapter}" if adapter else ""
            raise RuntimeError(f"vLLM could not start for model {model}{what}: {e}") from e
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def use_adapter(self, adapter: str) -> None:
        """Sample from another LoRA adapter of the rank the engine started with (PPO: each rollout's policy).

        Each call gets a new LoRA id, since vLLM caches adapters by id, not by path.
        """
        from vllm.lora.request import LoRARequest

        if self.lora is None:
            raise RuntimeError("use_adapter needs an engine started with an adapter (enable_lora)")
        self.lora = LoRARequest(Path(adapter).name, self.lora.lora_int_id + 1, str(adapter))
        self.policy = policy_name(self.model, adapter)

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        from vllm import SamplingParams

        inputs = []
        for r in requests:
            text = self.processor.apply_chat_template(r.messages, add_generation_prompt=True)
            item: dict[str, Any] = {"prompt": text}
            if r.images:
                item["multi_modal_data"] = {"image": r.images[0] if len(r.images) == 1 else r.images}
            inputs.append(item)
        params = [
            SamplingParams(
                n=num_samples,
                seed=derive_seed(seed, r.prompt_id),
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_new_tokens,
            )
            for r in requests
        ]
        outs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        return [[_generation(c) for c in o.outputs] for o in outs]


def _generation(completion: Any) -> Generation:
    finish = "length" if completion.finish_reason == "length" else "stop"
    return Generation(completion.text, len(completion.token_ids), finish, list(completion.token_ids))
