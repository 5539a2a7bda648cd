"""Sampling with a vLLM engine (GPU, or vLLM's CPU build).

Each prompt gets its own seed derived from the call's seed and its prompt id, so a prompt's
samples do not depend on which other prompts share the batch. On CPU, vLLM's
`gpu_memory_utilization` is the share of host RAM reserved for the KV cache; its default (0.92)
fails at start-up there, so the CPU default here is 0.1 (and eager mode, see `_engine_options`).
A share fails wherever other processes hold memory: the option `kv_cache_memory` (GiB) sizes the
KV cache by an absolute amount instead (vLLM's `kv_cache_memory_bytes`), and wins over the share.
Code that creates this backend needs an `if __name__ == "__main__":` guard: vLLM starts its
workers with spawn.

`data_parallel_size: N` runs N independent engines, one per process, each on its own
`tensor_parallel_size` GPUs (on CPU: its own slice of the cores), and splits every call's prompts
between them. Samples do not change with N: a prompt's seed depends on its id only.

A LoRA adapter is applied by vLLM's LoRA support where vLLM can apply it (no merging, and PPO can
swap adapters between rollouts); otherwise (DoRA, modules_to_save, a vision-tower LoRA, a rank
above 512, ...) the backend warns and samples from a merged temporary copy of the model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import tempfile
import traceback
import warnings
import weakref
from functools import partial
from pathlib import Path
from typing import Any

from alignkit.console import verbose
from alignkit.errors import SampleError, SetupError
from alignkit.models import LANGUAGE_MODEL, load_processor, merge_adapter
from alignkit.sample.base import Generation, RejectedPrompts, Request, derive_seed, join_answers, policy_name


def _engine_options(options: dict[str, Any] | None) -> dict[str, Any]:
    from vllm.platforms import current_platform

    # its weight-loading bar is shown with `alignkit -v`, as transformers' is
    defaults: dict[str, Any] = {"tensor_parallel_size": 1, "dtype": "auto", "max_model_len": None,
                                "use_tqdm_on_load": verbose()}  # fmt: skip
    if current_platform.is_cpu():
        # torch.compile added ~90 s to every engine start on a 2-core machine; CPU runs are small.
        # A seeded request whose prefill is split over steps fails on CPU in vLLM 0.32 ("CPU Generator
        # does not use offset" when the partial step's token is discarded): prefill whole prompts.
        defaults |= {"gpu_memory_utilization": 0.1, "enforce_eager": True, "enable_chunked_prefill": False}
    options = dict(options or {})
    if (gib := options.pop("kv_cache_memory", None)) is not None:
        options["kv_cache_memory_bytes"] = int(gib * 2**30)  # vLLM then ignores gpu_memory_utilization
    return defaults | options


def make_vllm_backend(
    model: str, adapter: str | None = None, *, options: dict[str, Any] | None = None, **settings: Any
) -> VllmBackend | DataParallelVllm:
    """A `VllmBackend`, or a `DataParallelVllm` over several when options has data_parallel_size > 1."""
    opts = dict(options or {})
    size = opts.pop("data_parallel_size", 1)
    if size > 1:
        return DataParallelVllm(model, adapter, size=size, options=opts, **settings)
    return VllmBackend(model, adapter, options=opts, **settings)


class VllmBackend:
    seeds_per_prompt = True

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
        from vllm import LLM

        self.model, self.policy = model, policy_name(model, adapter)
        # The processor owns the multimodal chat template (tokenizers of hub VLMs may lack it).
        self.processor = load_processor(model)
        opts = _engine_options(options)
        self.lora = None
        engine_model, lora_adapter, self._merged = _engine_model(model, adapter)
        if lora_adapter:
            from vllm.lora.request import LoRARequest

            opts = {"enable_lora": True, "max_lora_rank": _max_lora_rank(_adapter_rank(lora_adapter))} | opts
            self.lora = LoRARequest("adapter", 1, str(lora_adapter))
        try:
            self.llm = LLM(model=engine_model, **opts)
        except Exception as e:
            what = f" with LoRA adapter {adapter}" if self.lora else ""
            raise SetupError(f"vLLM could not start for model {engine_model}{what} (check policy.model and sample.vllm): {e}") from e
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    def use_adapter(self, adapter: str) -> None:
        """Sample from another LoRA adapter of the rank the engine started with (PPO: each rollout's policy).

        Each call gets a new LoRA id, since vLLM caches adapters by id, not by path.
        """
        from vllm.lora.request import LoRARequest

        if self.lora is None:
            raise RuntimeError(
                "use_adapter needs an engine started with an adapter that vLLM applies as LoRA (not a merged copy)"
            )
        self.lora = LoRARequest(Path(adapter).name, self.lora.lora_int_id + 1, str(adapter))
        self.policy = policy_name(self.model, adapter)

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

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
                # vLLM's incremental detokenizer costs Python time per sequence per step (~10% of the
                # tiny model's throughput on CPU); the texts are decoded once at the end instead.
                detokenize=False,
            )
            for r in requests
        ]
        try:
            outs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        except VLLMClientError as e:  # vLLM refused a request (e.g. longer than max_model_len) and ran none
            if len(requests) == 1:
                raise RejectedPrompts({requests[0].prompt_id: str(e)}, []) from e
            return self._one_by_one(requests, num_samples, seed)
        completions = [c for o in outs for c in o.outputs]
        token_ids = [c.token_ids for c in completions]
        texts = iter(self.processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True))
        return [[_generation(c, next(texts)) for c in o.outputs] for o in outs]

    def _one_by_one(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        """Each request alone, to tell the refused ones from the rest. A request's seed is its own, so
        its answers are those it gets in any batch."""
        return join_answers(partial(self.generate, [r], num_samples, seed) for r in requests)


class DataParallelVllm:
    """Several vLLM engines, one per worker process; each call's requests are split evenly between them."""

    seeds_per_prompt = True

    def __init__(self, model: str, adapter: str | None = None, *, size: int, options: dict[str, Any], **settings: Any):
        from vllm.platforms import current_platform

        self.model, self.policy = model, policy_name(model, adapter)
        tensor_parallel = options.get("tensor_parallel_size", 1)
        cpus = sorted(os.sched_getaffinity(0)) if current_platform.is_cpu() else None
        ctx = multiprocessing.get_context("spawn")  # a forked child would inherit this process's torch threads
        engine_model, lora_adapter, self._merged = _engine_model(model, adapter)  # one merged copy for all
        self.workers = []
        for rank in range(size):
            parent, child = ctx.Pipe()
            env = _rank_env(rank, size, tensor_parallel, dict(os.environ), cpus)
            args = (child, env, engine_model, lora_adapter, options, settings)
            proc = ctx.Process(target=_serve, args=args, name=f"vllm-dp{rank}")
            proc.start()
            self.workers.append((proc, parent))
        weakref.finalize(self, _stop, list(self.workers))
        for rank, (_, conn) in enumerate(self.workers):
            _reply(conn, rank)

    def use_adapter(self, adapter: str) -> None:
        """As `VllmBackend.use_adapter`, on every engine."""
        for _, conn in self.workers:
            conn.send(("use_adapter", adapter))
        for rank, (_, conn) in enumerate(self.workers):
            _reply(conn, rank)
        self.policy = policy_name(self.model, adapter)

    def generate(self, requests: list[Request], num_samples: int, seed: int) -> list[list[Generation]]:
        per = -(-len(requests) // len(self.workers))
        shards = [requests[i * per : (i + 1) * per] for i in range(len(self.workers))]
        for (_, conn), shard in zip(self.workers, shards):
            conn.send(("generate", shard, num_samples, seed))
        return join_answers(partial(_reply, conn, rank) for rank, (_, conn) in enumerate(self.workers))


def _rank_env(
    rank: int, size: int, tensor_parallel: int, environ: dict[str, str], cpus: list[int] | None
) -> dict[str, str]:
    """Environment for data-parallel rank `rank` of `size`: its `tensor_parallel` GPUs out of those
    visible (CUDA_VISIBLE_DEVICES, else 0, 1, ...); on CPU (`cpus`: the usable cores) an even share
    of the cores, one group per tensor-parallel worker in vLLM's VLLM_CPU_OMP_THREADS_BIND syntax."""
    need = f"data_parallel_size={size} x tensor_parallel_size={tensor_parallel} needs that many"
    if cpus is None:
        first = rank * tensor_parallel
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(size * tensor_parallel)]
        if len(devices) < size * tensor_parallel:
            raise SampleError(f"sample.vllm: {need} GPUs; visible: {','.join(devices)}")
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices[first : first + tensor_parallel])}
    per_worker = len(cpus) // (size * tensor_parallel)
    if per_worker == 0:
        raise SampleError(f"sample.vllm: {need} CPU cores; this machine has {len(cpus)}")
    groups = [cpus[(rank * tensor_parallel + w) * per_worker :][:per_worker] for w in range(tensor_parallel)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, g)) for g in groups)}


def _serve(
    conn, env: dict[str, str], model: str, adapter: str | None, options: dict[str, Any], settings: dict[str, Any]
) -> None:
    """A data-parallel worker: start one engine, then answer the parent's calls until it hangs up."""
    os.environ.update(env)  # before vLLM or CUDA start in this process
    try:
        backend = VllmBackend(model, adapter, options=options, **settings)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            call, *args = conn.recv()
        except EOFError:
            return
        if call == "stop":
            return
        try:
            conn.send(("ok", getattr(backend, call)(*args)))
        except RejectedPrompts as e:
            conn.send(("rejected", e))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _reply(conn, rank: int) -> Any:
    """A worker's answer; its exception, re-raised here with its traceback."""
    try:
        status, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"vLLM data-parallel worker {rank} died (see its output above)") from None
    if status == "error":
        raise RuntimeError(f"vLLM data-parallel worker {rank} failed:\n{value}")
    if status == "rejected":
        raise value
    return value


def _stop(workers: list) -> None:
    for _, conn in workers:
        try:
            conn.send(("stop",))
        except OSError:
            pass
    for proc, _ in workers:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def _engine_model(
    model: str, adapter: str | None
) -> tuple[str, str | None, tempfile.TemporaryDirectory | None]:
    """The model and LoRA adapter to start vLLM with: `adapter` as LoRA where vLLM can apply it;
    else (with a warning) a copy of `model` with `adapter` merged in, in a temporary directory
    that lives as long as the returned handle."""
    if not adapter or not (problem := lora_problem(adapter, model)):
        return model, adapter, None
    warnings.warn(
        f"vLLM cannot apply adapter {adapter} as LoRA ({problem}); sampling from a merged temporary copy "
        "of the model instead",
        stacklevel=3,
    )
    tmp = tempfile.TemporaryDirectory(prefix="alignkit-merged-")
    return str(merge_adapter(model, adapter, Path(tmp.name) / "model")), None, tmp


def _max_lora_rank(rank: int) -> int | None:
    """The smallest `max_lora_rank` vLLM accepts (8, 16, 32, ...) that fits `rank`; None above its largest."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    return min((r for r in get_args(MaxLoRARanks) if r >= max(rank, 8)), default=None)


def _adapter_rank(adapter: str) -> int:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]


def lora_problem(adapter: str, model: str | None = None) -> str | None:
    """Why vLLM cannot apply `adapter` (on `model`, default: the adapter's base model) as LoRA, or None if it can.

    The architecture first (vLLM has no LoRA for some, e.g. LLaVA-OneVision); then vLLM's own checks
    (DoRA, bias, modules_to_save, initialisations that change the base weights, rank), and weights
    outside the language model: vLLM adapts only the language model of a VLM and would silently
    leave e.g. a vision-tower LoRA out.
    """
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    model = model or json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if model and (arch := _architecture_without_lora(model)):
        return f"vLLM has no LoRA support for the {arch} architecture"
    rank = _adapter_rank(adapter)
    max_rank = _max_lora_rank(rank)
    if max_rank is None:
        return f"its rank {rank} is above the largest vLLM supports"
    try:
        PEFTHelper.from_local_dir(adapter, None).validate_legal(LoRAConfig(max_lora_rank=max_rank))
    except ValueError as e:
        return str(e)
    outside = [k for k in _adapter_weight_names(adapter) if not re.search(rf"\.{LANGUAGE_MODEL}\.", k)]
    return f"it has weights outside the language model, e.g. {outside[0]}" if outside else None


def _architecture_without_lora(model: str) -> str | None:
    """`model`'s architecture if vLLM implements it without LoRA support; None when it has LoRA, or
    when vLLM does not know it (starting the engine then says so) or the config cannot be read."""
    from transformers import AutoConfig
    from vllm.model_executor.models.interfaces import supports_lora
    from vllm.model_executor.models.registry import ModelRegistry

    try:
        architectures = AutoConfig.from_pretrained(model).architectures or []
    except (OSError, ValueError):
        return None
    for arch in architectures:
        model_class = ModelRegistry._try_load_model_cls(arch)  # None for an architecture vLLM lacks
        if model_class is not None and not supports_lora(model_class):
            return arch
    return None


def _adapter_weight_names(adapter: str) -> list[str]:
    path = Path(adapter) / "adapter_model.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    import torch

    return list(torch.load(Path(adapter) / "adapter_model.bin", map_location="cpu", weights_only=True))


def _generation(completion: Any, text: str) -> Generation:
    finish = "length" if completion.finish_reason == "length" else "stop"
    return Generation(text, len(completion.token_ids), finish, list(completion.token_ids))
