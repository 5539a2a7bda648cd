"""End to end: the quickstart recipe through the `alignkit` command.

The recipe trains a hallucinating base policy (SFT from random weights), runs one RLAIF round and
evaluates before and after. `test_quickstart_shows_alignment` runs it exactly as the README does and
asserts what the README says it shows: CHAIR_i falls, significantly by the paired bootstrap, and the
run ends with the before/after table and the report's path. The mechanics test runs a reduced
version (a few SFT steps, few prompts) twice with an OpenAI-compatible LLM judge (the chat-completions
test fixture server on localhost) and once with the reference judge: finished stages are reused, the
judge's requests are never repeated, and the adapter loads with peft and generates.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.evaluate import evaluate_answers, headline, paired_tests
from alignkit.records import Prompt
from alignkit.testing.chat_server import ChatServer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
KEY = "sk-test-quickstart-0123456789"
# The quickstart at mechanics size: a base that has not learned to see, 16 prompts x 4 samples.
SMALL = ["sft.max_steps=8", "sft.synthetic.num_examples=32", "data.synthetic.num_prompts=16", "sample.num_samples=4",
         "eval.synthetic.num_prompts=8", "eval.judge=false"]  # fmt: skip


def alignkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip


@pytest.mark.slow
def test_quickstart_shows_alignment(tmp_path):
    """The README's command (default threads, the recipe unchanged): CHAIR_i falls significantly."""
    res = alignkit("run", RECIPE, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    eval_dir = tmp_path / "run" / "eval"
    before, after = (json.loads((eval_dir / d / "results.json").read_text()) for d in ("base", "round-1"))
    test = paired_tests(before, after)["describe.chair_i"]
    print(f"CHAIR_i {before['describe']['chair_i']:.3f} -> {after['describe']['chair_i']:.3f}, "
          f"change {test['diff']:+.3f} [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}], p={test['p']:.4f}")  # fmt: skip
    assert before["describe"]["chair_i"] > 0.1  # the base policy does hallucinate
    assert test["diff"] < 0 and test["ci"][1] < 0 and test["significant"]
    # the run ends with the before/after table and the report's path, each line within 80 columns
    tail = res.stdout[res.stdout.index("before -> after") :]
    assert "describe.chair_i" in tail and "report.html" in tail
    assert all(len(line) <= 80 for line in tail.splitlines()), tail


@pytest.mark.slow
def test_quickstart_mechanics(tmp_path):
    out = tmp_path / "run"
    with ChatServer(model="judge-fixture") as server:
        llm_judge = [f"output_dir={out}", "judge.backend=openai", f"judge.base_url={server.url}",
                     "judge.model=judge-fixture", *SMALL]  # fmt: skip
        first = alignkit("run", RECIPE, *llm_judge, cwd=tmp_path)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        sent = len(server.chat_requests)
        assert sent == 16 * 4  # one request per sample
        assert all(r.image_urls() and r.image_urls()[0].startswith("data:image/") for r in server.chat_requests)

        again = alignkit("run", RECIPE, *llm_judge, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.chat_requests) == sent  # nothing re-billed
        assert again.stdout.count("up to date, skipped") == 7  # sft, prompts, sample, judge, pairs, train, eval

    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".sqlite", ".txt", ".partial"):
            assert KEY.encode() not in f.read_bytes(), f

    readme_way = alignkit("run", RECIPE, f"output_dir={out}", *SMALL, cwd=tmp_path)
    assert readme_way.returncode == 0, readme_way.stderr[-3000:]
    assert "sample: up to date, skipped" in readme_way.stdout  # the judge changed, the samples did not
    assert "train: up to date" not in readme_way.stdout  # new pairs, so DPO ran again
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(out / "sft" / "model")
    model = PeftModel.from_pretrained(base, out / "train" / "adapter")
    processor = AutoProcessor.from_pretrained(out / "train" / "adapter")
    ids = processor(text=["<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"],
                    return_tensors="pt")  # fmt: skip
    assert model.generate(**ids, max_new_tokens=4).shape[1] > ids["input_ids"].shape[1]


def test_headline_is_the_tested_rates_with_intervals(tmp_path):
    """The run's closing table: each paired-tested rate before and after with its 95% interval and
    the paired test's p, as `evaluate_answers` and `paired_tests` give them; within 80 columns."""
    prompts = [Prompt(f"p{i}", "Describe the image.", [], "describe", None, ["red square", "blue circle"])
               for i in range(40)]  # fmt: skip
    right, wrong = "There is a red square and a blue circle.", "There is a red square and a green triangle."
    before = evaluate_answers(prompts, {p.prompt_id: wrong if i % 2 else right for i, p in enumerate(prompts)})
    after = evaluate_answers(prompts, {p.prompt_id: wrong if i % 10 == 1 else right for i, p in enumerate(prompts)})
    lines = headline(before, after).splitlines()
    assert lines[0].split() == ["metric", "before", "[95%", "CI]", "after", "[95%", "CI]", "p"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {f"describe.{k}" for k in ("chair_i", "chair_i_unique", "chair_s")}
    chair_i = rows["describe.chair_i"]
    # hand count: 20 of 80 mentions hallucinated before (0.25), 4 of 80 after (0.05)
    b, a = before["describe"], after["describe"]
    assert (b["chair_i"], a["chair_i"]) == (0.25, 0.05)
    assert f"0.250 [{b['chair_i_ci'][0]:.3f}, {b['chair_i_ci'][1]:.3f}]" in chair_i
    assert f"0.050 [{a['chair_i_ci'][0]:.3f}, {a['chair_i_ci'][1]:.3f}]" in chair_i
    p = paired_tests(before, after)["describe.chair_i"]["p"]
    assert chair_i.endswith("<0.001" if p < 0.001 else f"{p:.3f}")
    assert all(len(line) <= 80 for line in lines)
    # no change at all: every test says so (p = 1, not significant)
    assert all(line.endswith("1.000 n.s.") for line in headline(before, before).splitlines()[2:])


def test_module_and_stage_help():
    for args in (["--help"], ["run", "--help"], ["judge", "--help"], ["eval", "--help"]):
        res = subprocess.run([sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "Usage" in res.stdout, res.stderr


def test_bad_recipe_key_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "alignkit", "run", RECIPE, "sample.num_smaples=2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2
    assert "sample.num_smaples" in res.stderr and "unknown key" in res.stderr and "Traceback" not in res.stderr
