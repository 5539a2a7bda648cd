"""The `sft` stage: supervised fine-tuning before preference training; its model becomes the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.models.device import COMPUTE_KEYS
from alignkit.models.lengths import skipped_summary
from alignkit.records import write_jsonl
from alignkit.stage import Context, launch_files, model_identity, settings_of, template_files
from alignkit.tracking import TRACKING_KEYS
from alignkit.train.config import SftConfig


class SftStage:
    """Supervised fine-tuning on image+text prompt/completion conversations (the recipe's `sft` section);
    the model in sft/model becomes the policy the later stages sample and train."""

    name = command = "sft"
    per_round = False
    # `launch` counts: the global batch is batch_size x grad_accum x num_processes, and an accelerate
    # config file may set the mixed precision (its bytes are in `reads`).
    exclude = frozenset({"sft.save_steps", "sft.logging_steps", "train.gradient_checkpointing", *TRACKING_KEYS})

    def distributed(self, recipe) -> bool:
        return True  # runs as launch.num_processes processes (alignkit.launch)

    def config(self, recipe) -> tuple[str, ...]:
        return ("sft", "policy.model", "sample.template", "seed", "launch", "tracking", *COMPUTE_KEYS)

    def reads(self, ctx: Context) -> list[Path]:
        cfg = ctx.config.sft
        if cfg is None:
            from alignkit.errors import StageInputError

            raise StageInputError("stage 'sft' needs an `sft` section in the recipe")
        return [*(Path(p.data) for p in cfg.phase_configs() if p.data), *template_files(ctx.config.sample.template),
                *launch_files(ctx)]  # fmt: skip

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {"model": model_identity(ctx.config.policy.model)}

    def output(self, ctx: Context) -> Path:
        return ctx.paths.sft / "model"

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        """Runs in every process of a launch: the main one writes the data, all of them train. With
        `sft.phases`, each phase but the last is a step of its own (sft/phase-<n>), skipped on a re-run
        when its settings and everything before it are unchanged."""
        phases, model = ctx.config.sft.phase_configs(), ctx.config.policy.model
        for n, phase in enumerate(phases[:-1], 1):
            out = ctx.paths.sft / f"phase-{n}"
            # the stage's own settings, with only the phases up to this one
            settings = settings_of(self, ctx.recipe) | {"sft": [_learning_keys(p) for p in phases[:n]]}
            reads = [*([Path(p.data) for p in phases[:n] if p.data]), *template_files(ctx.config.sample.template),
                     *launch_files(ctx)]  # fmt: skip
            key = f"{self.name}:phase-{n}"
            ctx.step(key, settings, reads, out / "model",
                     lambda _fp, phase=phase, out=out, model=model, key=key: self._train(ctx, phase, out, model, key))  # fmt: skip
            model = str(out / "model")
        return self._train(ctx, phases[-1], ctx.paths.sft, model, self.name) | {"phases": len(phases)}

    def _train(self, ctx: Context, cfg: SftConfig, sft_dir: Path, model: str, key: str) -> dict[str, Any]:
        """One phase: its data (written by the main process when synthetic), then `train_sft` into
        `sft_dir`, logging to tracker run `key`."""
        from alignkit.models.device import ComputeSettings, process_state
        from alignkit.train.sft import train_sft

        state = process_state()
        data_file = Path(cfg.data) if cfg.data else sft_dir / "data.jsonl"
        summary: dict[str, Any] = {}
        if cfg.synthetic is not None:
            if state.is_main_process:
                from alignkit.sample.templates import load_template
                from alignkit.worlds.shapes import make_shapes_prompts, sft_examples

                syn = cfg.synthetic
                prompts = make_shapes_prompts(sft_dir, syn.num_examples, seed=syn.seed, tasks=tuple(syn.tasks))
                rows = sft_examples(
                    prompts,
                    load_template(ctx.config.sample.template),
                    syn.error_rate,
                    seed=syn.seed,
                    yes_bias=syn.yes_bias,
                    exists_answer_first=syn.exists_answer_first,
                )
                write_jsonl(data_file, rows)
                summary["hallucinated_share"] = sum(r["hallucinated"] for r in rows) / len(rows)
            state.wait_for_everyone()
        compute = ComputeSettings.of(ctx.config.train)
        model_dir = train_sft(data_file, sft_dir, cfg, model=model, seed=ctx.config.seed,
                              logging_steps=cfg.logging_steps, compute=compute,
                              tracking=ctx.tracking(key))  # fmt: skip
        return summary | {"model": str(model_dir), **skipped_summary(sft_dir), "num_processes": state.num_processes,
                          "mixed_precision": compute.precision(),
                          "global_batch_size": cfg.batch_size * cfg.grad_accum * state.num_processes}  # fmt: skip


def _learning_keys(cfg: SftConfig) -> dict[str, Any]:
    """A phase's settings that change what it learns: the stage's `exclude` applies to each phase."""
    ignored = {key.removeprefix("sft.") for key in SftStage.exclude if key.startswith("sft.")}
    return cfg.model_dump(mode="json", exclude={"phases", *ignored})
