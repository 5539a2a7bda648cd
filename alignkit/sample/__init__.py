"""The sampling stage: K chain-of-thought answers per prompt, written as resumable Sample records.

Prompts are processed in fixed chunks (by position in the prompt list), each with its own seed.
A chunk that is only partly on disk after a kill is generated again, and only its missing prompts
are written, so the final file is the same wherever a run was interrupted. Backends with a seed
per prompt (vLLM, OpenAI-compatible servers) are asked for the missing prompts only; transformers,
whose answers depend on the batch, for the whole chunk.

Exact duplicates among a prompt's K samples (same text) are counted in the summary; with
`drop_duplicates` they are not written (a pair of identical answers teaches nothing and a judge
scores both alike). Ids stay stable: the kept samples keep their indices, so a prompt may lack some.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from alignkit.console import progress
from alignkit.errors import ModelError, RecordError, SampleError
from alignkit.models import resolve_model
from alignkit.records import Prompt, ResumableJsonl, Sample, load_image, sample_id
from alignkit.sample.base import Backend, Generation, RejectedPrompts, Request, derive_seed
from alignkit.sample.config import SampleConfig
from alignkit.sample.templates import Template, load_template, parse_output

__all__ = [
    "Backend", "Generation", "RejectedPrompts", "Request", "SampleConfig", "Template", "load_template", "make_backend", "parse_output",
    "run_sample", "sample_prompts", "to_request", "to_samples",
]  # fmt: skip

BACKENDS = ("transformers", "vllm", "openai")
# The `sample` keys that only the OpenAI-compatible backend reads.
OPENAI_KEYS = {"base_url", "model_name", "api_key_env", "concurrency", "timeout", "max_retries", "rpm", "tpm", "logprobs"}


def make_backend(
    backend: str,
    model: str,
    adapter: str | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    vllm_options: dict | None = None,
    openai_options: dict | None = None,
) -> Backend:
    """Build a backend by name; `model` may be a "tiny:..." name, a hub id or a local path.

    `openai_options` go to `OpenAIBackend` (base_url, model_name: the served name, default `model`;
    api_key_env, concurrency, ...). That server must serve `adapter` itself, under `model_name`.
    """
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if backend == "openai":
        from alignkit.sample.openai_backend import OpenAIBackend

        opts = dict(openai_options or {})
        if adapter and not opts.get("model_name"):
            raise SampleError(
                f"policy.adapter={adapter} with sample.backend=openai: the server must serve the adapter; "
                "set sample.model_name to the name it serves it under (vllm serve BASE --enable-lora "
                "--lora-modules NAME=ADAPTER_DIR)"
            )
        model_name = opts.pop("model_name", None) or model
        return OpenAIBackend(model_name, opts.pop("base_url", None), adapter=adapter, **opts, **settings)
    if backend not in BACKENDS:
        raise SampleError(f"sample.backend: unknown sampling backend {backend!r}; known: {BACKENDS}")
    model = resolve_model(model)
    try:
        if backend == "transformers":
            from alignkit.sample.transformers_backend import TransformersBackend

            return TransformersBackend(model, adapter, batch_size=batch_size, **settings)
        from alignkit.sample.vllm_backend import make_vllm_backend

        return make_vllm_backend(model, adapter, options=vllm_options, **settings)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier", a missing file
        what = f"policy.model={model}" + (f" with policy.adapter={adapter}" if adapter else "")
        raise ModelError(f"{what}: cannot load it for sampling ({e})") from e


def to_request(prompt: Prompt, template: Template) -> Request:
    """Render a prompt and load its images; an unreadable image is an error naming the prompt."""
    images = []
    for path in prompt.images:
        try:
            images.append(load_image(path))
        except Exception as e:
            raise RecordError(f"prompt {prompt.prompt_id}: cannot read image {path}: {e}") from e
    return Request(prompt.prompt_id, template.messages(prompt.question, len(images)), images)


def to_samples(
    prompt_id: str, gens: list[Generation], template: Template, policy: str, drop_duplicates: bool
) -> list[Sample]:
    """A prompt's Samples, indexed by draw order; with `drop_duplicates`, repeats of an earlier text are left out."""
    out, seen = [], set()
    for k, g in enumerate(gens):
        if drop_duplicates and g.text in seen:
            continue
        seen.add(g.text)
        reasoning, answer, parsed = template.parse(g.text)
        out.append(
            Sample(sample_id(prompt_id, k), prompt_id, g.text, reasoning, answer, parsed,
                   g.num_tokens, g.finish_reason, policy)
        )  # fmt: skip
    return out


def _finished(done: dict[str, dict[str, Any]], num_samples: int, drop_duplicates: bool) -> set[str]:
    """Prompts whose samples are all on disk.

    With `drop_duplicates` a finished prompt may lack ids on purpose. A prompt's samples are
    appended together, so a kill tears only the last prompt written: every earlier one is finished.
    """
    counts: defaultdict[str, int] = defaultdict(int)
    for r in done.values():
        counts[r["prompt_id"]] += 1
    finished = {p for p, n in counts.items() if n == num_samples}
    if drop_duplicates and done:
        finished |= set(counts) - {next(reversed(done.values()))["prompt_id"]}
    return finished


def _duplicates(records: list[dict[str, Any]], num_samples: int) -> int:
    """Samples that repeat an earlier sample of their prompt word for word (written or dropped)."""
    texts: defaultdict[str, set[str]] = defaultdict(set)
    for r in records:
        texts[r["prompt_id"]].add(r["text"])
    return sum(num_samples - len(t) for t in texts.values())


def sample_prompts(
    backend: Backend,
    prompts: list[Prompt],
    out_path: Path,
    *,
    fingerprint: str,
    template: str = "cot",
    num_samples: int = 4,
    seed: int = 0,
    chunk_size: int = 16,
    drop_duplicates: bool = False,
) -> dict[str, Any]:
    """Sample with an existing backend (so one engine can serve several runs); see `run_sample`."""
    tmpl = load_template(template)
    out = ResumableJsonl(out_path, fingerprint, id_key="sample_id")
    complete = {p.prompt_id for p in prompts} & _finished(out.done, num_samples, drop_duplicates)
    failed: list[dict[str, str]] = []
    bar = progress(total=len(prompts), initial=len(complete), desc="sample", unit="prompt")
    try:
        for c in range(0, len(prompts), chunk_size):
            chunk = prompts[c : c + chunk_size]
            if all(p.prompt_id in complete for p in chunk):
                continue
            if backend.seeds_per_prompt:  # nothing redone or re-billed: the missing prompts only
                chunk = [p for p in chunk if p.prompt_id not in complete]
            requests = []
            for p in chunk:
                try:
                    requests.append(to_request(p, tmpl))
                except ValueError as e:
                    failed.append({"prompt_id": p.prompt_id, "error": str(e)})
            chunk_seed = derive_seed(seed, "chunk", c // chunk_size)

            def keep(prompt_id: str, gens: list[Generation]) -> None:
                """Write a prompt's samples (those not on disk yet): each paid answer is kept at once."""
                samples = to_samples(prompt_id, gens, tmpl, backend.policy, drop_duplicates)
                out.append([s for s in samples if s.sample_id not in out.done])

            # A backend that streams (a server: each prompt is its own paid request) hands each prompt's
            # answers over as they arrive, so a kill or another prompt's failure loses none of them.
            stream = {"on_answers": keep} if getattr(backend, "streams_answers", False) else {}
            try:
                gens = backend.generate(requests, num_samples, chunk_seed, **stream) if requests else []
            except RejectedPrompts as e:
                failed += [{"prompt_id": p, "error": f"prompt {p}: {m}"} for p, m in e.errors.items()]
                requests, gens = [r for r in requests if r.prompt_id not in e.errors], e.generations
            for r, g in zip(requests, gens):
                keep(r.prompt_id, g)  # samples already on disk (streamed, or torn by a kill) were drawn identically
            bar.update(sum(p.prompt_id not in complete for p in chunk))
    except BaseException:
        out.close()
        raise
    finally:
        bar.close()
    records = list(out.done.values())
    if failed and not records:
        out.close()
        shown = "\n".join(f["error"] for f in failed[:5])
        ids = ", ".join(f["prompt_id"] for f in failed[:10]) + (" ..." if len(failed) > 10 else "")
        raise SampleError(
            f"every prompt failed ({len(failed)}), nothing was sampled; failed prompt ids: {ids}; the first:\n{shown}"
        )
    position = {p.prompt_id: i for i, p in enumerate(prompts)}
    out.finish(order=lambda r: (position.get(r["prompt_id"], len(position)), int(r["sample_id"].rsplit("#s", 1)[1])))
    duplicates = _duplicates(records, num_samples)
    return {
        "num_prompts": len(prompts),
        "num_samples": len(records),
        "duplicates": duplicates,
        "duplicates_dropped": duplicates if drop_duplicates else 0,
        "truncated": sum(r["finish_reason"] == "length" for r in records),
        "unparsed": sum(not r["answer_parsed"] for r in records),
        "resumed_prompts": len(complete),
        "failed": failed,
    }


def run_sample(
    prompts: list[Prompt],
    out_path: Path,
    cfg: SampleConfig = SampleConfig(),
    *,
    fingerprint: str,
    model: str,
    adapter: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `cfg.num_samples` Samples per prompt to `out_path` (resumable) and return a summary.

    The summary has num_prompts, num_samples (written), duplicates (samples repeating an earlier
    one of their prompt), duplicates_dropped (those not written), truncated (finish_reason
    "length"), unparsed, resumed_prompts and failed (prompt id + message for each prompt skipped
    because an image could not be read or the backend refused its input, e.g. longer than the
    model's context). If every prompt fails, that is an error.
    """
    load_template(cfg.template)  # fail on a bad template before loading a model
    engine = make_backend(
        cfg.backend, model, adapter, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, vllm_options=cfg.vllm.model_dump(exclude_none=True),
        openai_options=cfg.model_dump(include=OPENAI_KEYS),
    )  # fmt: skip
    return sample_prompts(
        engine, prompts, out_path, fingerprint=fingerprint, template=cfg.template, num_samples=cfg.num_samples,
        seed=seed, chunk_size=cfg.chunk_size, drop_duplicates=cfg.drop_duplicates,
    )  # fmt: skip
