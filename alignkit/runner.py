"""Runs a recipe's stages in order in one run directory, skipping work that is already done.

Each stage has a fingerprint: a hash of its settings and of the bytes of its input files. A stage
whose output exists under the same fingerprint is skipped. A stage killed midway resumes: jsonl
stages keep their finished records (see `records.ResumableJsonl`), the judge never re-sends a
cached request, and training resumes from its last checkpoint.

Run directory:
    recipe.yaml        the resolved recipe, secrets removed
    stages.json        fingerprint and summary of each finished stage
    prompts.jsonl      images/ (prompt images)
    samples.jsonl      verdicts.jsonl   judge_cache.sqlite   pairs.jsonl
    train/             checkpoints/, metrics.jsonl, adapter/ (the PEFT adapter + processor), or
                       model/ (MM-DPO with finetune: full); cleared when a train setting changes
    ref_logps/         MM-DPO's reference log-prob cache, keyed by reference-model fingerprint, so it
                       outlives the train/ directory (changing beta, w or k reuses it)
    reward_model/      rm_scores.jsonl   the critique reward model and its scores of the samples
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from alignkit.errors import RecipeError, StageInputError
from alignkit.recipe import STAGES, Recipe, resolved_yaml
from alignkit.records import Prompt, Sample, Verdict, file_digest, read_prompts, read_records, write_jsonl


# Stages that run once per round; round r > 1 writes them under round-<r>/ and keys them `name@round-r`.
ROUND_STAGES = ("sample", "judge", "pairs", "reward_model", "score", "train")


@dataclass(frozen=True)
class RunPaths:
    """Where each stage writes inside a run directory (round 1 at the top, round r in round-<r>/)."""

    root: Path
    round: int = 1

    @property
    def work(self) -> Path:
        """The directory of this round's samples, verdicts, pairs and training."""
        return self.root if self.round == 1 else self.root / f"round-{self.round}"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def state(self) -> Path:
        return self.root / "stages.json"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def samples(self) -> Path:
        return self.work / "samples.jsonl"

    @property
    def verdicts(self) -> Path:
        return self.work / "verdicts.jsonl"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge_cache.sqlite"

    @property
    def pairs(self) -> Path:
        return self.work / "pairs.jsonl"

    @property
    def train(self) -> Path:
        return self.work / "train"

    @property
    def adapter(self) -> Path:
        return self.work / "train" / "adapter"

    @property
    def model(self) -> Path:
        """The fully fine-tuned policy (MM-DPO with `finetune: full`), instead of `adapter`."""
        return self.work / "train" / "model"

    @property
    def ref_logps(self) -> Path:
        return self.root / "ref_logps"


def fingerprint(stage: str, settings: dict[str, Any], inputs: list[Path]) -> str:
    """Hash of a stage's settings and the content of its input files."""
    payload = {"stage": stage, "settings": settings, "inputs": {p.name: file_digest(p) for p in inputs}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Runner:
    """Runs the stages of one recipe; keeps per-stage state in `stages.json`."""

    def __init__(self, recipe: Recipe, console: Console | None = None, round: int = 1):
        self.recipe = recipe
        self.paths = RunPaths(Path(recipe.output_dir).resolve(), round)  # records carry absolute image paths
        self.console = console or Console()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = json.loads(self.paths.state.read_text()) if self.paths.state.exists() else {}

    def _save_state(self) -> None:
        tmp = self.paths.state.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.paths.state)

    def _stage(
        self,
        name: str,
        settings: dict[str, Any],
        inputs: list[Path],
        output: Path,
        work: Callable[[str], dict[str, Any]],
    ) -> dict[str, Any]:
        missing = [p for p in inputs if not p.exists()]
        if missing:
            raise StageInputError(
                f"stage '{name}' needs {', '.join(str(p) for p in missing)}; run the earlier stages first "
                f"(alignkit run RECIPE, or the stage command that writes it)"
            )
        if self.paths.round > 1 and name in ROUND_STAGES:
            name = f"{name}@round-{self.paths.round}"
        fp = fingerprint(name, settings, inputs)
        last = self.state.get(name, {})
        if output.exists() and last.get("fingerprint") == fp and last.get("status") == "done":
            self.console.print(f"[green]✓[/] {name}: up to date, skipped ({output})")
            return last["summary"]
        if last.get("fingerprint") not in (None, fp) and output.is_dir():
            shutil.rmtree(output)  # checkpoints or results of other inputs or settings are stale
        self.state[name] = {"fingerprint": fp, "status": "running"}
        self._save_state()
        self.console.rule(f"[bold]{name}")
        start = time.monotonic()
        summary = work(fp)
        summary["seconds"] = round(time.monotonic() - start, 2)
        self.state[name] = {"fingerprint": fp, "status": "done", "summary": summary}
        self._save_state()
        self.console.print(f"[green]✓[/] {name}: {json.dumps(summary, default=str)}")
        return summary

    # -- stages ---------------------------------------------------------------------------------

    def prompts(self) -> dict[str, Any]:
        data = self.recipe.data
        inputs = [Path(data.prompts)] if data.prompts and Path(data.prompts).is_file() else []

        def work(fp: str) -> dict[str, Any]:
            if data.synthetic is not None:
                from alignkit.testing.shapes import make_shapes_prompts

                syn = data.synthetic
                prompts = make_shapes_prompts(
                    self.paths.root, syn.num_prompts, seed=syn.seed, tasks=tuple(syn.tasks)
                )
            else:
                prompts = read_prompts(data.prompts, self.paths.root / "images")
            write_jsonl(self.paths.prompts, prompts)
            return {"num_prompts": len(prompts)}

        return self._stage("prompts", data.model_dump(), inputs, self.paths.prompts, work)

    def sample(self) -> dict[str, Any]:
        from alignkit.sample import run_sample

        cfg, policy = self.recipe.sample, self.recipe.policy
        # Keys that cannot change the samples stay out of the fingerprint: changing them keeps the file.
        unchanging = {"concurrency": True, "api_key_env": True, "vllm": {"data_parallel_size"}}
        settings = {"sample": cfg.model_dump(exclude=unchanging),
                    "policy": policy.model_dump() | self._policy_settings(), "seed": self.recipe.seed}  # fmt: skip

        def work(fp: str) -> dict[str, Any]:
            return run_sample(
                read_records(self.paths.prompts, Prompt),
                self.paths.samples,
                fingerprint=fp,
                backend=cfg.backend,
                model=self.policy_model,
                adapter=policy.adapter,
                num_samples=cfg.num_samples,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=self.recipe.seed,
                template=cfg.template,
                batch_size=cfg.batch_size,
                chunk_size=cfg.chunk_size,
                drop_duplicates=cfg.drop_duplicates,
                vllm_options=cfg.vllm.model_dump(exclude_none=True),
                openai_options=dict(base_url=cfg.base_url, model_name=cfg.model_name, api_key_env=cfg.api_key_env,
                                    concurrency=cfg.concurrency, logprobs=cfg.logprobs),  # fmt: skip
            )

        return self._stage("sample", settings, [self.paths.prompts], self.paths.samples, work)

    def judge(self) -> dict[str, Any]:
        from alignkit.judge import run_judge
        from alignkit.judge.rubric import load_rubric

        cfg = self.recipe.judge
        # The rubric's content is part of the fingerprint: editing a judge prompt re-runs the stage
        # (and the verdict cache keeps every verdict the edit did not affect).
        settings = {"judge": cfg.model_dump(), "rubric_hash": load_rubric(cfg.rubric).content_hash}

        def work(fp: str) -> dict[str, Any]:
            return run_judge(
                read_records(self.paths.prompts, Prompt),
                read_records(self.paths.samples, Sample),
                self.paths.verdicts,
                fingerprint=fp,
                cache_path=self.paths.judge_cache,
                **self._judge_options(),
            )

        inputs = [self.paths.prompts, self.paths.samples]
        return self._stage("judge", settings, inputs, self.paths.verdicts, work)

    def pairs(self) -> dict[str, Any]:
        from alignkit.pairs import build_pairs
        from alignkit.sample.templates import load_template

        cfg, template = self.recipe.pairs, self.recipe.sample.template
        settings = {"pairs": cfg.model_dump(), "template": template}

        def work(fp: str) -> dict[str, Any]:
            prompts = read_records(self.paths.prompts, Prompt)
            tmpl = load_template(template)
            pairs, summary = build_pairs(
                prompts,
                read_records(self.paths.samples, Sample),
                read_records(self.paths.verdicts, Verdict),
                {p.prompt_id: tmpl.render(p.question) for p in prompts},
                strategy=cfg.strategy,
                min_margin=cfg.min_margin,
            )
            write_jsonl(self.paths.pairs, pairs)
            return summary

        inputs = [self.paths.prompts, self.paths.samples, self.paths.verdicts]
        return self._stage("pairs", settings, inputs, self.paths.pairs, work)

    def train(self) -> dict[str, Any]:
        if self.recipe.train.method == "ppo":  # online RL: learns from the prompts and rewards, not pairs
            return self._train_ppo()
        from alignkit.train.dpo import train_dpo

        cfg = self.recipe.train
        settings = {"train": cfg.model_dump(), "model": self._policy_settings(), "seed": self.recipe.seed}
        train, method = train_dpo, {}
        if cfg.method == "mmdpo":  # train_dpo's arguments plus MM-DPO's own
            from alignkit.train.mmdpo import train_mmdpo

            train = train_mmdpo
            method = dict(w=cfg.w, k=cfg.k, gamma=cfg.gamma, margin_key=cfg.margin_key, finetune=cfg.finetune,
                          ref_cache_dir=self.paths.ref_logps)  # outside train/, which a setting change clears

        def work(fp: str) -> dict[str, Any]:
            adapter = train(
                self.paths.pairs,
                self.paths.train,
                model=self.policy_model,
                **method,
                beta=cfg.beta,
                learning_rate=cfg.learning_rate,
                num_epochs=cfg.num_epochs,
                max_steps=cfg.max_steps,
                batch_size=cfg.batch_size,
                grad_accum=cfg.grad_accum,
                lora_r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                max_length=cfg.max_length,
                save_steps=cfg.save_steps,
                seed=self.recipe.seed,
            )
            return {Path(adapter).name: str(adapter)}  # "adapter", or "model" (full fine-tuning)

        return self._stage("train", settings, [self.paths.pairs], self.paths.train, work)

    def _train_ppo(self) -> dict[str, Any]:
        """PPO on prompts.jsonl into train/ (metrics.jsonl, checkpoints/, adapter/ where `eval` finds it).

        K, answer length, temperature, top_p and the template come from the `sample` section, the
        learning rate, LoRA and checkpoint interval from `train`, the rest from `ppo`.
        """
        from alignkit.train import rewards
        from alignkit.train.ppo import PPOConfig, train_ppo

        cfg, ppo, sample = self.recipe.train, self.recipe.ppo, self.recipe.sample
        if cfg.finetune == "qlora":
            raise StageInputError("train.method ppo supports train.finetune lora or full, not qlora")
        config = PPOConfig(
            **ppo.model_dump(exclude={"rollout", "rewards"}), num_samples=sample.num_samples,
            max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_p=sample.top_p,
            learning_rate=cfg.learning_rate, save_steps=cfg.save_steps, seed=self.recipe.seed,
        )  # fmt: skip
        settings = {"train": cfg.model_dump(), "ppo": ppo.model_dump(), "sample": sample.model_dump(),
                    "judge": self.recipe.judge.model_dump(), "model": self._policy_settings(),
                    "seed": self.recipe.seed}  # fmt: skip

        def reward(spec) -> rewards.RewardFn:
            if spec.source in ("reference", "judge"):
                options = self._judge_options() | ({"backend": "reference"} if spec.source == "reference" else {})
                return rewards.judge_reward(cache_path=self.paths.judge_cache, **options)
            if spec.source == "reward_model":
                rm_dir = spec.path or self.paths.work / "reward_model" / "model"
                return rewards.reward_model_reward(rm_dir, sample.template, **self._score_options())
            return rewards.function_reward(spec.path)

        def work(fp: str) -> dict[str, Any]:
            out = train_ppo(
                read_records(self.paths.prompts, Prompt), self.paths.train, model=self.policy_model,
                reward=rewards.combine([(spec.weight, reward(spec)) for spec in ppo.rewards]), config=config,
                rollout=ppo.rollout, template=sample.template, finetune=cfg.finetune, lora_r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                vllm_options=sample.vllm.model_dump(exclude_none=True),
            )  # fmt: skip
            steps = [json.loads(line) for line in (self.paths.train / "metrics.jsonl").read_text().splitlines()]
            return {out.name: str(out), "reward_first": steps[0]["reward/raw"], "reward_last": steps[-1]["reward/raw"]}

        return self._stage("train", settings, [self.paths.prompts], self.paths.train, work)

    def reward_model(self) -> dict[str, Any]:
        """Train the critique reward model on the pairs (rationales as critiques) into reward_model/."""
        from alignkit.reward.losses import LossWeights
        from alignkit.reward.score import rm_pairs_digest
        from alignkit.reward.train import train_reward_model

        cfg = self.recipe.reward_model
        model = cfg.model or self.policy_model
        if not self.paths.pairs.exists():
            raise StageInputError(f"stage 'reward_model' needs {self.paths.pairs}; run the pairs stage first")
        # The pairs' content without the rm_* columns the score stage adds, so scoring never retrains.
        settings = {"reward_model": cfg.model_dump(), "model": model, "seed": self.recipe.seed,
                    "pairs": rm_pairs_digest(self.paths.pairs)}  # fmt: skip

        def work(fp: str) -> dict[str, Any]:
            summary = train_reward_model(
                self.paths.pairs,
                self.paths.work / "reward_model",
                model=model,
                finetune=cfg.finetune,
                learning_rate=cfg.learning_rate,
                max_steps=cfg.max_steps,
                batch_size=cfg.batch_size,
                weights=LossWeights(cfg.critique_weight, cfg.margin_weight, cfg.tie_weight, cfg.center_weight),
                use_critiques=cfg.use_critiques,
                eval_fraction=cfg.eval_fraction,
                lora_r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                seed=self.recipe.seed,
                score_options=self._score_options(),
            )
            if "held_out" in summary:
                ev = summary["held_out"]
                self.console.print(
                    f"reward model on held-out pairs: ACC {ev['acc']:.3f}  ACC+ {ev['acc_plus']:.3f} "
                    f"({ev['num_pairs']} pairs, {ev['num_prompts']} prompts)"
                )
            return summary

        return self._stage("reward_model", settings, [], self.paths.work / "reward_model", work)

    def _score_options(self) -> dict[str, Any]:
        cfg = self.recipe.reward_model
        return {"num_critiques": cfg.num_critiques, "max_new_tokens": cfg.max_critique_tokens,
                "temperature": cfg.critique_temperature, "batch_size": cfg.score_batch_size}  # fmt: skip

    def score(self) -> dict[str, Any]:
        """Score every sample with the reward model (rm_scores.jsonl) and add rm_* columns to the pairs."""
        from alignkit.reward.score import annotate_pairs_file, score_samples
        from alignkit.sample.templates import load_template

        cfg = self.recipe.reward_model
        rm_dir = Path(cfg.checkpoint) if cfg.checkpoint else self.paths.work / "reward_model" / "model"
        output = self.paths.work / "rm_scores.jsonl"
        settings = {"score": self._score_options(), "reward_model": str(rm_dir),
                    "template": self.recipe.sample.template, "seed": self.recipe.seed}  # fmt: skip

        def work(fp: str) -> dict[str, Any]:
            prompts = read_records(self.paths.prompts, Prompt)
            tmpl = load_template(self.recipe.sample.template)
            return score_samples(
                rm_dir,
                prompts,
                read_records(self.paths.samples, Sample),
                {p.prompt_id: tmpl.render(p.question) for p in prompts},
                output,
                seed=self.recipe.seed,
                **self._score_options(),
            )

        inputs = [self.paths.prompts, self.paths.samples, rm_dir / "head.safetensors"]
        summary = self._stage("score", settings, inputs, output, work)
        # Always (cheap): a re-run of the pairs stage rewrites pairs.jsonl without the rm_* columns.
        if self.paths.pairs.exists():
            ev = annotate_pairs_file(self.paths.pairs, output)
            self.console.print(
                f"reward model vs judge on {ev['num_pairs']} pairs: ACC {ev['acc']:.3f}  ACC+ {ev['acc_plus']:.3f}"
            )
            summary = {**summary, "pairs": ev}
        return summary

    def _judge_options(self) -> dict[str, Any]:
        """run_judge's keyword arguments from the recipe's judge section (the judge and eval stages)."""
        cfg = self.recipe.judge
        return dict(
            backend=cfg.backend, rubric=cfg.rubric, model=cfg.model, base_url=cfg.base_url,
            api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, timeout=cfg.timeout,
            max_retries=cfg.max_retries, image_max_side=cfg.image_max_side, rpm=cfg.rpm, tpm=cfg.tpm,
            num_judgments=cfg.num_judgments,
        )  # fmt: skip

    @property
    def start_model(self) -> str:
        """The policy before any round: the SFT model if the recipe has SFT, else policy.model."""
        return str(self.paths.root / "sft" / "model") if self.recipe.sft is not None else self.recipe.policy.model

    @property
    def policy_model(self) -> str:
        """The model this round samples from and trains on: the start model in round 1, then the
        previous round's trained policy (merged, so DPO's reference is the previous policy)."""
        if self.paths.round == 1:
            return self.start_model
        return str(RunPaths(self.paths.root, self.paths.round - 1).train / "merged")

    def trained_policy(self) -> tuple[str, str | None] | None:
        """(model, adapter) of the policy the train stage wrote, or None before it has written one:
        the starting model with train/adapter (LoRA, QLoRA), or train/model alone (finetune: full)."""
        cfg = self.recipe.train
        if cfg.method in ("mmdpo", "ppo") and cfg.finetune == "full":
            return (str(self.paths.model), None) if self.paths.model.exists() else None
        return (self.policy_model, str(self.paths.adapter)) if self.paths.adapter.exists() else None

    def _policy_settings(self) -> dict[str, Any]:
        """What identifies this round's policy in fingerprints (the SFT run, the previous round's training)."""
        previous = {}
        if self.paths.round > 1:
            key = "train" if self.paths.round == 2 else f"train@round-{self.paths.round - 1}"
            previous = {"previous_train": self.state.get(key, {}).get("fingerprint")}
        return {"model": self.policy_model, "sft": self.state.get("sft", {}).get("fingerprint")} | previous

    def _merge_previous_round(self) -> None:
        """Merge the previous round's adapter into its base, as this round's starting policy."""
        from alignkit.train.model import merge_adapter

        previous = Runner(self.recipe, self.console, round=self.paths.round - 1)
        trained = previous.trained_policy()
        if trained is None:
            raise StageInputError(
                f"round {self.paths.round} starts from round {self.paths.round - 1}'s trained policy, which "
                f"does not exist yet; run the earlier round first (alignkit run RECIPE)"
            )
        out = previous.paths.train / "merged"
        key = "train" if previous.paths.round == 1 else f"train@round-{previous.paths.round}"
        settings = {"trained": trained, "train": self.state.get(key, {}).get("fingerprint")}

        def work(fp: str) -> dict[str, Any]:
            return {"merged": str(merge_adapter(*trained, out))}

        self._stage(f"merge@round-{previous.paths.round}", settings, [], out, work)

    def sft(self) -> dict[str, Any]:
        """Supervised fine-tuning (e.g. a base policy from scratch on the shapes world) into sft/model."""
        from alignkit.train.sft import train_sft

        cfg = self.recipe.sft
        if cfg is None:
            raise StageInputError("stage 'sft' needs an `sft` section in the recipe")
        sft_dir = self.paths.root / "sft"
        data_file = Path(cfg.data) if cfg.data else sft_dir / "data.jsonl"
        template = self.recipe.sample.template
        settings = {"sft": cfg.model_dump(), "model": self.recipe.policy.model, "template": template,
                    "seed": self.recipe.seed}  # fmt: skip

        def work(fp: str) -> dict[str, Any]:
            summary: dict[str, Any] = {}
            if cfg.synthetic is not None:
                from alignkit.sample.templates import load_template
                from alignkit.testing.shapes import make_shapes_prompts, sft_examples

                syn = cfg.synthetic
                prompts = make_shapes_prompts(sft_dir, syn.num_examples, seed=syn.seed)
                rows = sft_examples(prompts, load_template(template), syn.error_rate, seed=syn.seed)
                write_jsonl(data_file, rows)
                summary["hallucinated_share"] = sum(r["hallucinated"] for r in rows) / len(rows)
            model_dir = train_sft(
                data_file, sft_dir, model=self.recipe.policy.model, finetune=cfg.finetune,
                learning_rate=cfg.learning_rate, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                warmup_steps=cfg.warmup_steps, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                save_steps=cfg.save_steps, seed=self.recipe.seed,
            )  # fmt: skip
            return summary | {"model": str(model_dir)}

        return self._stage("sft", settings, [data_file] if cfg.data else [], sft_dir / "model", work)

    def _eval_prompts(self) -> Path:
        """Materialise the held-out eval prompts into eval/prompts.jsonl (a stage of its own)."""
        cfg = self.recipe.eval
        eval_dir = self.paths.root / "eval"
        out = eval_dir / "prompts.jsonl"

        def work(fp: str) -> dict[str, Any]:
            if cfg.synthetic is not None:
                from alignkit.testing.shapes import make_shapes_prompts

                syn = cfg.synthetic
                prompts = make_shapes_prompts(eval_dir, syn.num_prompts, seed=syn.seed, tasks=tuple(syn.tasks))
            else:
                prompts = read_prompts(cfg.prompts, eval_dir / "images")
            write_jsonl(out, prompts)
            return {"num_prompts": len(prompts)}

        inputs = [Path(cfg.prompts)] if cfg.prompts and Path(cfg.prompts).is_file() else []
        settings = {"prompts": cfg.prompts, "synthetic": cfg.synthetic and cfg.synthetic.model_dump()}
        self._stage("eval:prompts", settings, inputs, out, work)
        return out

    def _eval_policy(self, label: str, model: str, adapter: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        """Evaluate one policy on the held-out prompts into eval/<label>/results.json."""
        from alignkit.evaluate import run_eval

        cfg = self.recipe.eval
        prompts_file = self._eval_prompts()
        out_dir = self.paths.root / "eval" / label
        results_file = out_dir / "results.json"
        settings = {"eval": cfg.model_dump(), "policy": extra, "adapter": adapter, "seed": self.recipe.seed,
                    "template": self.recipe.sample.template,
                    "judge": self.recipe.judge.model_dump() if cfg.judge else None}  # fmt: skip

        def work(fp: str) -> dict[str, Any]:
            prompts = read_records(prompts_file, Prompt)
            results = run_eval(
                prompts, out_dir, fingerprint=fp, backend=cfg.backend, model=model, adapter=adapter,
                template=self.recipe.sample.template, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, seed=self.recipe.seed, batch_size=cfg.batch_size,
                vllm_options=self.recipe.sample.vllm.model_dump(exclude_none=True),
            )  # fmt: skip
            if cfg.judge:
                from alignkit.judge import run_judge

                summary = run_judge(
                    prompts, read_records(out_dir / "answers.jsonl", Sample), out_dir / "verdicts.jsonl",
                    fingerprint=fp, cache_path=self.paths.judge_cache, **self._judge_options(),
                )  # fmt: skip
                results["judge_score"] = summary.get("mean_score")
            tmp = results_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, results_file)
            return {"results": str(results_file)}

        self._stage(f"eval:{label}", settings, [prompts_file], results_file, work)
        return json.loads(results_file.read_text())

    def eval(self) -> dict[str, Any]:
        """Evaluate the starting policy and the trained one (when trained); print the comparison."""
        from alignkit.evaluate import compare, format_table

        if self.recipe.eval is None:
            raise StageInputError("stage 'eval' needs an `eval` section in the recipe")
        start = {"model": self.start_model, "sft": self.state.get("sft", {}).get("fingerprint")}
        base = self._eval_policy("base", self.start_model, self.recipe.policy.adapter, start)
        trained_policy = self.trained_policy()
        if trained_policy is None:
            self.console.print(format_table(base))
            return {"base": str(self.paths.root / "eval" / "base" / "results.json")}
        key = "train" if self.paths.round == 1 else f"train@round-{self.paths.round}"
        trained = self._policy_settings() | {"train": self.state.get(key, {}).get("fingerprint")}
        after = self._eval_policy(f"round-{self.paths.round}", *trained_policy, trained)
        table = compare(base, after)
        (self.paths.root / "eval" / "comparison.txt").write_text(table + "\n")
        self.console.print(table)
        return {"comparison": str(self.paths.root / "eval" / "comparison.txt")}

    # -- driver ---------------------------------------------------------------------------------

    def run(self, stages: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Run `stages` (default: the recipe's) in pipeline order; return each stage's summary."""
        wanted = stages or list(self.recipe.stages)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise RecipeError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
        tmp = self.paths.recipe.with_suffix(".yaml.tmp")
        tmp.write_text(resolved_yaml(self.recipe))
        os.replace(tmp, self.paths.recipe)
        results = {name: getattr(self, name)() for name in ("sft", "prompts") if name in wanted}
        per_round = [name for name in STAGES if name in wanted and name not in results]
        root = self.paths.root
        for r in range(1, self.recipe.rounds + 1):
            self.paths = RunPaths(root, r)
            if r > 1 and per_round:
                self._merge_previous_round()
            for name in per_round:
                results[name if r == 1 else f"{name}@round-{r}"] = getattr(self, name)()
        return results
