"""The common mistakes, through the real `alignkit` command: each is one line `error: ...` that names
the file, key, line or record id, exit code 2, and no traceback (`--debug` shows it)."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from alignkit.cli import app

RECIPE = """\
output_dir: {out}
policy:
  model: tiny:qwen2-vl
data:
  prompts: prompts.jsonl
sample:
  backend: transformers
  num_samples: 2
  max_new_tokens: 4
"""

PROMPTS = [
    {"prompt_id": "a", "question": "What is there?", "images": ["missing-a.png"]},
    {"prompt_id": "b", "question": "How many?", "images": ["missing-b.png"]},
]


@pytest.fixture
def recipe(tmp_path):
    """A recipe reading prompts.jsonl (whose images do not exist) into tmp_path/run."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run"))
    return path


def fails(*args: str, expect: list[str]) -> str:
    """Run `alignkit ARGS`; assert exit 2, one `error:` line naming every string in `expect`, no traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert "Traceback" not in out and out.count("error: ") == 1, out
    message = out[out.index("error: ") :]
    for s in expect:
        assert s in message, (s, message)
    return message


def line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_unknown_stage(recipe):
    fails("run", recipe, "--stages", "prompts,smaple", expect=["smaple", "prompts, sample, judge"])


def test_typo_in_a_recipe_key(recipe):
    recipe.write_text(recipe.read_text().replace("num_samples:", "num_smaples:"))
    fails("run", recipe, expect=[f"{recipe}:{line_of(recipe, 'num_smaples')}: sample.num_smaples: unknown key"])


def test_wrong_type(recipe):
    recipe.write_text(recipe.read_text().replace("max_new_tokens: 4", "max_new_tokens: many"))
    fails("run", recipe, expect=[f"{recipe}:{line_of(recipe, 'max_new_tokens')}: sample.max_new_tokens:"])


def test_bad_override(recipe):
    fails("run", recipe, "sample.num_samples", expect=["override 'sample.num_samples'", "section.key=value"])
    fails("run", recipe, "sample.num_samples=[1,", expect=["override 'sample.num_samples=[1,'", "not valid YAML"])
    fails("run", recipe, "sample.num_samples=0", expect=["sample.num_samples", "with overrides"])


def test_missing_recipe(tmp_path):
    fails("run", tmp_path / "nope.yaml", expect=[f"{tmp_path / 'nope.yaml'}: recipe file not found"])
    fails("prompts", "quickstrat", expect=["quickstrat", "quickstart", "alignkit recipes"])
    fails("run", tmp_path, expect=[f"{tmp_path}: is a directory"])


def test_missing_prompts_file(recipe):
    (recipe.parent / "prompts.jsonl").unlink()
    fails("prompts", recipe, expect=[f"{recipe.parent / 'prompts.jsonl'}: prompts file or directory not found"])


def test_prompts_with_a_bad_line(recipe):
    prompts = recipe.parent / "prompts.jsonl"
    prompts.write_text(prompts.read_text() + '{"prompt_id": "c", "question": \n')
    fails("prompts", recipe, expect=[f"{prompts}:3: not valid JSON"])
    prompts.write_text(json.dumps(PROMPTS[0]) + '\n{"prompt_id": "c"}\n')
    fails("prompts", recipe, expect=[f"{prompts}:2: missing key(s) ['question']"])


def test_duplicate_prompt_id(recipe):
    prompts = recipe.parent / "prompts.jsonl"
    prompts.write_text(prompts.read_text() + json.dumps(PROMPTS[0]) + "\n")
    fails("prompts", recipe, expect=[f"{prompts}:3: duplicate prompt_id 'a'"])


def test_bad_template_path(recipe):
    fails("run", recipe, "--stages", "prompts,sample", "sample.template=nope.yaml",
          expect=["sample.template", "'nope.yaml'", "cot, think, plain"])  # fmt: skip
    bad = recipe.parent / "t.yaml"
    bad.write_text("instruction: Be brief.\nstyle: bullets\n")
    fails("sample", recipe, f"sample.template={bad}", expect=[f"{bad}: style: 'bullets'"])


def test_missing_judge_rubric(recipe):
    fails("judge", recipe, "judge.rubric=nope.yaml", expect=["nope.yaml", "not found"])
    fails("judge", recipe, "judge.rubric=overal", expect=["unknown judge 'overal'", "overall"])


def test_judge_yaml_with_an_error(recipe):
    from alignkit.resources import builtin_dir

    judge = recipe.parent / "j.yaml"
    judge.write_text((builtin_dir("judges") / "overall.yaml").read_text().replace("{{ question }}", "{{ question }"))
    fails("judge", recipe, f"judge.rubric={judge}", expect=[f"{judge}: user: bad template"])
    judge.write_text("name: j\nsytem: Grade it.\n")
    fails("judge", recipe, f"judge.rubric={judge}", expect=[f"{judge}", "sytem", "unknown key"])


def test_unknown_tiny_model(recipe):
    fails("run", recipe, "--stages", "prompts,sample", "policy.model=tiny:nope",
          expect=["tiny:nope", "tiny:qwen2-vl"])  # fmt: skip


def test_missing_local_model(recipe, tmp_path):
    fails("run", recipe, "--stages", "prompts,sample", f"policy.model={tmp_path / 'no-model'}",
          expect=[f"model {tmp_path / 'no-model'}: no such directory"])  # fmt: skip


def test_missing_api_key(recipe, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_TEST_NO_KEY", raising=False)
    fails("run", recipe, "--stages", "prompts,sample", "sample.backend=openai", "sample.api_key_env=ALIGNKIT_TEST_NO_KEY",
          expect=["sample.backend=openai", "ALIGNKIT_TEST_NO_KEY"])  # fmt: skip


def test_every_prompt_failed_names_the_prompts(recipe, tiny_qwen_dir):
    message = fails("run", recipe, "--stages", "prompts,sample", f"policy.model={tiny_qwen_dir}",
                    expect=["every prompt failed (2)", "a, b", "missing-a.png"])  # fmt: skip
    assert "prompt a: cannot read image" in message


def test_function_reward_with_a_bad_spec(recipe, tmp_path):
    fails("run", recipe, "train.method=ppo", "ppo.rewards=[{source: function, path: my_rewards}]",
          expect=["ppo.rewards.0", "'module:function'"])  # fmt: skip
    fails("run", recipe, "--stages", "prompts,train", "train.method=ppo",
          "ppo.rewards=[{source: function, path: alignkit_no_such_module:score}]",
          expect=["ppo.rewards", "alignkit_no_such_module"])  # fmt: skip
    fails("run", recipe, "--stages", "prompts,train", "train.method=ppo",
          f"ppo.rewards=[{{source: function, path: {tmp_path / 'nope.py'}:score}}]",
          expect=[f"{tmp_path / 'nope.py'} not found"])  # fmt: skip


def test_stage_before_its_input(recipe):
    fails("judge", recipe, expect=["stage 'judge' needs", "prompts.jsonl", "samples.jsonl"])


@pytest.mark.slow  # imports TRL (~10-30 s)
def test_train_before_pairs(recipe):
    fails("train", recipe, expect=["stage 'train' needs", "pairs.jsonl"])


@pytest.mark.slow  # imports TRL
@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_qlora_without_cuda(recipe):
    run = recipe.parent / "run"
    run.mkdir()
    (run / "pairs.jsonl").write_text("{}\n")
    fails("train", recipe, "train.method=mmdpo", "train.finetune=qlora", expect=["QLoRA", "CUDA GPU", "finetune='lora'"])


def test_compare_with_a_missing_or_bad_file(tmp_path):
    good = tmp_path / "results.json"
    good.write_text(json.dumps({"num_prompts": 2}))
    fails("compare", good, tmp_path / "nope.json", expect=[f"{tmp_path / 'nope.json'}: file not found"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_prompts": 2,\n oops}')
    fails("compare", bad, good, expect=[f"{bad}:2: not valid JSON"])


def test_make_tiny_model_with_an_unknown_name(tmp_path):
    fails("make-tiny-model", "tiny:nope", tmp_path, expect=["tiny:nope", "tiny:llava"])


def test_debug_shows_the_traceback(recipe):
    command = [sys.executable, "-m", "alignkit", "run", str(recipe), "--stages", "smaple"]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "error: " in plain.stderr
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RecipeError: unknown stage(s) smaple" in debug.stderr
    # the environment variable does the same, and CliRunner sees the exception itself
    result = CliRunner().invoke(app, ["run", str(recipe), "--stages", "smaple"], env={"ALIGNKIT_DEBUG": "1"})
    assert result.exit_code == 1 and type(result.exception).__name__ == "RecipeError"
