"""The runner: stages in order, skipped when inputs and settings are unchanged, re-run when not."""

import json

import pytest

from alignkit.recipe import load_recipe
from alignkit.records import Sample, read_records, write_jsonl
from alignkit.runner import RecipeError, Runner, StageInputError

RECIPE = """\
output_dir: {out}
data:
  synthetic: {{num_prompts: 6, seed: 4, tasks: [describe, count]}}
judge:
  backend: reference
  base_url: https://user:hunter2@judge.example/v1
pairs:
  strategy: threshold
"""


def recipe(tmp_path, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run"))
    return load_recipe(path, list(overrides))


def fake_samples(runner):
    """Two answers per prompt, one faithful (the gold answer) and one hallucinating."""
    from alignkit.records import Prompt

    rows = []
    for p in read_records(runner.paths.prompts, Prompt):
        rows.append(Sample(f"{p.prompt_id}#s0", p.prompt_id, p.reference_answer, "", p.reference_answer, True, 5, "stop"))
        wrong = "There is a purple triangle and a yellow square." if p.task == "describe" else "9"
        rows.append(Sample(f"{p.prompt_id}#s1", p.prompt_id, wrong, "", wrong, True, 5, "stop"))
    write_jsonl(runner.paths.samples, rows)


def test_stages_run_then_skip_then_rerun_on_change(tmp_path):
    runner = Runner(recipe(tmp_path))
    runner.run(["prompts"])
    fake_samples(runner)
    runner.run(["judge", "pairs"])
    pairs = [json.loads(l) for l in runner.paths.pairs.read_text().splitlines()]
    assert len(pairs) == 6 and all(p["chosen_id"].endswith("#s0") for p in pairs)
    mtimes = {p: p.stat().st_mtime_ns for p in (runner.paths.verdicts, runner.paths.pairs)}

    again = Runner(recipe(tmp_path))
    again.run(["prompts", "judge", "pairs"])
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten

    changed = Runner(recipe(tmp_path, "pairs.min_margin=2.0"))  # no pair reaches a margin of 2
    summary = changed.run(["judge", "pairs"])
    assert runner.paths.verdicts.stat().st_mtime_ns == mtimes[runner.paths.verdicts]
    assert summary["pairs"]["num_pairs"] == 0


def test_changed_input_reruns_downstream(tmp_path):
    runner = Runner(recipe(tmp_path))
    runner.run(["prompts"])
    fake_samples(runner)
    first = runner.run(["judge"])["judge"]
    rows = read_records(runner.paths.samples, Sample)
    write_jsonl(runner.paths.samples, rows[:-2])  # one prompt fewer
    second = Runner(recipe(tmp_path)).run(["judge"])["judge"]
    assert (first["total"], second["total"]) == (12, 10)


def test_missing_input_names_the_file_and_what_to_run(tmp_path):
    runner = Runner(recipe(tmp_path))
    runner.run(["prompts"])
    with pytest.raises(StageInputError, match=r"stage 'judge' needs .*samples\.jsonl"):
        runner.run(["judge"])


def test_resolved_recipe_is_saved_without_secrets(tmp_path):
    runner = Runner(recipe(tmp_path))
    runner.run(["prompts"])
    text = runner.paths.recipe.read_text()
    assert "hunter2" not in text and "num_prompts: 6" in text


def test_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        Runner(recipe(tmp_path)).run(["smaple"])


def test_one_process_per_run_directory_and_a_killed_owner_is_taken_over(tmp_path):
    import subprocess
    import sys

    from alignkit.lock import RunLockedError

    hold = ("import sys, time\nfrom pathlib import Path\nfrom alignkit.lock import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n")  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another alignkit process \(pid {owner.pid}\)"):
            Runner(recipe(tmp_path)).run(["prompts"])
        assert not (tmp_path / "run" / "prompts.jsonl").exists()  # it stopped before doing anything
    finally:
        owner.kill()  # SIGKILL: the lock file stays behind, the kernel's lock does not
        owner.wait()
    Runner(recipe(tmp_path)).run(["prompts"])
    assert (tmp_path / "run" / "prompts.jsonl").exists()


def test_a_recipe_with_sft_but_without_its_model_stops_before_anything_runs(tmp_path):
    """Leaving sft out of the stages keeps the SFT model as the policy: a clear error says so and how
    to start from policy.model instead, before any stage writes anything."""
    runner = Runner(recipe(tmp_path, "sft={synthetic: {num_examples: 4}}"))
    with pytest.raises(RecipeError, match=r"stage 'sample' starts from the SFT model .*sft/model.*sft=null"):
        runner.run(["prompts", "sample", "judge"])
    assert not runner.paths.prompts.exists()
    runner.run(["prompts"])  # stages that never load the policy still run
    assert runner.paths.prompts.exists()
