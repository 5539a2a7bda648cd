"""The `eval` stage: held-out evaluation of the starting policy and of each round's trained policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.judge.stage import UNCHANGING as JUDGE_UNCHANGING
from alignkit.records import Prompt, Sample, read_records, write_atomic, write_jsonl
from alignkit.sample.stage import VLLM_UNCHANGING
from alignkit.stage import Context, stage_key, template_files
from alignkit.tracking import TRACKING_KEYS, Tracking, log_results


def _source_files(cfg) -> list[Path]:
    """The eval prompts' file(s): eval.prompts, or the benchmark's question and annotation files."""
    from alignkit.data.stage import source_files
    from alignkit.evaluate.benchmarks import benchmark_files

    return source_files(cfg) if cfg.benchmark == "prompts" else benchmark_files(cfg)


class EvalStage:
    """Evaluate on held-out prompts (the recipe's `eval` section): CHAIR_i/CHAIR_s hallucination, POPE
    existence accuracy/precision/recall/F1/yes-ratio, count and colour accuracy (each with its 95%
    interval; CHAIR under `eval.vocabulary`), and the judge's mean score, greedy by default; or a published
    benchmark from its local files (`eval.benchmark`: pope, coco_chair, amber, mmhal; see
    alignkit/evaluate/benchmarks.py). Evaluates the starting policy (any checkpoint: override policy.model and
    policy.adapter) and, once trained, the aligned one, and prints the side-by-side comparison."""

    name = command = "eval"
    per_round = True
    exclude = frozenset({*VLLM_UNCHANGING, *JUDGE_UNCHANGING, *TRACKING_KEYS})

    def config(self, recipe) -> tuple[str, ...]:
        judged = recipe.eval is not None and (recipe.eval.judge or recipe.eval.benchmark == "mmhal")
        judge = ("judge",) if judged else ()
        return ("eval", "sample.template", "sample.vllm", "policy.adapter", *judge, "seed", "tracking")

    def reads(self, ctx: Context) -> list[Path]:
        from alignkit.errors import StageInputError
        from alignkit.judge.stage import judge_files, vocabulary_files

        cfg = ctx.config.eval
        if cfg is None:
            raise StageInputError("stage 'eval' needs an `eval` section in the recipe")
        if cfg.benchmark == "mmhal":  # scored by the recipe's judge endpoint with MMHal-Bench's rubric
            judge = judge_files(ctx.config.judge.model_copy(update={"rubric": "mmhal"}))
        else:
            judge = judge_files(ctx.config.judge) if cfg.judge else []
        return [*_source_files(cfg), *template_files(ctx.config.sample.template), *judge,
                *vocabulary_files(cfg.vocabulary)]  # fmt: skip

    def upstream(self, ctx: Context) -> dict[str, Any]:
        return {"start": ctx.lineage.policy_identity(1),
                "trained": ctx.lineage.fingerprint(stage_key("train", ctx.round))}  # fmt: skip

    def output(self, ctx: Context) -> Path:
        label = f"round-{ctx.round}" if ctx.lineage.trained(ctx.round) else "base"
        return ctx.paths.eval / label / "results.json"

    def run(self, ctx: Context, fingerprint: str) -> dict[str, Any]:
        from alignkit.evaluate import compare, format_table

        base = self._evaluate(ctx, "base", ctx.lineage.policy(1), ctx.config.policy.adapter,
                              {"start": ctx.lineage.policy_identity(1)})  # fmt: skip
        trained = ctx.lineage.trained(ctx.round)
        tracking = Tracking.for_stage(ctx.config.tracking, ctx.paths.root, self.name)  # one run: base, round 1, ...
        log_results(tracking, base, step=0)
        if trained is None:
            ctx.console.print(format_table(base))
            return {"base": str(ctx.paths.eval / "base" / "results.json")}
        identity = {"policy": ctx.lineage.policy_identity(ctx.round),
                    "train": ctx.lineage.fingerprint(stage_key("train", ctx.round))}  # fmt: skip
        after = self._evaluate(ctx, f"round-{ctx.round}", *trained, identity)
        log_results(tracking, after, step=ctx.round)
        table = compare(base, after)
        write_atomic(ctx.paths.eval / "comparison.txt", table + "\n")
        ctx.console.print(table)
        return {"comparison": str(ctx.paths.eval / "comparison.txt")}

    def _prompts(self, ctx: Context) -> Path:
        """The held-out prompts in eval/prompts.jsonl, made once (a cached step of their own)."""
        from alignkit.data.stage import make_prompts
        from alignkit.evaluate import benchmarks

        cfg, out = ctx.config.eval, ctx.paths.eval / "prompts.jsonl"

        def work(fp: str) -> dict[str, Any]:
            if cfg.benchmark == "prompts":
                prompts = make_prompts(cfg, ctx.paths.eval)[: cfg.max_questions]
            else:
                prompts = benchmarks.load_prompts(cfg)
            write_jsonl(out, prompts)
            return {"num_prompts": len(prompts)}

        settings = {"prompts": cfg.prompts, "synthetic": cfg.synthetic and cfg.synthetic.model_dump(),
                    **cfg.model_dump(include={"benchmark", "path", "images", "max_questions"})}  # fmt: skip
        ctx.step("eval:prompts", settings, _source_files(cfg), out, work)
        return out

    def _evaluate(self, ctx: Context, label: str, model: str, adapter: str | None,
                  identity: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """One policy on the held-out prompts into eval/<label>/results.json (a cached step)."""
        from alignkit.evaluate import run_eval
        from alignkit.stage import settings_of

        cfg, prompts_file = ctx.config.eval, self._prompts(ctx)
        out_dir = ctx.paths.eval / label
        results_file = out_dir / "results.json"

        def work(fp: str) -> dict[str, Any]:
            prompts = read_records(prompts_file, Prompt)
            results = run_eval(
                prompts, out_dir, cfg, fingerprint=fp, model=model, adapter=adapter,
                template=ctx.config.sample.template, seed=ctx.config.seed, vllm=ctx.config.sample.vllm,
            )  # fmt: skip
            if cfg.benchmark == "mmhal":
                from alignkit.evaluate.benchmarks import judge_mmhal

                scores = judge_mmhal(cfg, ctx.config.judge, prompts, out_dir, fingerprint=fp,
                                     cache_path=ctx.paths.judge_cache)  # fmt: skip
                results["mmhal"], results["outcomes"]["mmhal"] = scores["mmhal"], scores["outcomes"]["mmhal"]
            elif cfg.judge:
                from alignkit.judge import run_judge

                answers = read_records(out_dir / "answers.jsonl", Sample)
                summary = run_judge(prompts, answers, out_dir / "verdicts.jsonl", ctx.config.judge, fingerprint=fp,
                                    cache_path=ctx.paths.judge_cache)  # fmt: skip
                results["judge_score"] = summary.get("mean_score")
            write_atomic(results_file, json.dumps(results, indent=2))
            return {"results": str(results_file)}

        settings = {"config": settings_of(self, ctx.recipe), "policy": identity}
        reads = [prompts_file, *self.reads(ctx)]
        ctx.step(f"eval:{label}", settings, reads, results_file, work)
        return json.loads(results_file.read_text())
