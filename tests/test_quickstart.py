"""End to end: the quickstart recipe through the `alignkit` command, with the real vLLM engine.

First with an OpenAI-compatible LLM judge (the chat-completions test fixture server on localhost),
then as the README runs it (reference judge): the sample stage is reused, the judge's requests are
never repeated, and the adapter loads with peft and generates.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.testing.chat_server import ChatServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-quickstart-0123456789"


def alignkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    out = tmp_path / "run"
    with ChatServer(model="judge-fixture") as server:
        llm_judge = [f"output_dir={out}", "judge.backend=openai", f"judge.base_url={server.url}",
                     "judge.model=judge-fixture"]
        first = alignkit("run", recipe, *llm_judge, cwd=tmp_path)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        sent = len(server.chat_requests)
        assert sent == 16 * 4  # one request per sample
        assert all(r.image_urls() and r.image_urls()[0].startswith("data:image/") for r in server.chat_requests)

        again = alignkit("run", recipe, *llm_judge, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.chat_requests) == sent  # nothing re-billed
        assert again.stdout.count("up to date, skipped") == 5

    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".sqlite", ".txt", ".partial"):
            assert KEY.encode() not in f.read_bytes(), f

    readme_way = alignkit("run", recipe, f"output_dir={out}", cwd=tmp_path)
    assert readme_way.returncode == 0, readme_way.stderr[-3000:]
    assert "sample: up to date, skipped" in readme_way.stdout  # the judge changed, the samples did not
    assert "train: up to date" not in readme_way.stdout  # new pairs, so DPO ran again
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from alignkit.models import resolve_model

    base = AutoModelForImageTextToText.from_pretrained(resolve_model("tiny:qwen2-vl"))
    model = PeftModel.from_pretrained(base, out / "train" / "adapter")
    processor = AutoProcessor.from_pretrained(out / "train" / "adapter")
    ids = processor(text=["<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"],
                    return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4).shape[1] > ids["input_ids"].shape[1]


def test_module_and_stage_help():
    for args in (["--help"], ["run", "--help"], ["judge", "--help"], ["eval", "--help"]):
        res = subprocess.run([sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "Usage" in res.stdout, res.stderr


def test_bad_recipe_key_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "alignkit", "run", str(ROOT / "recipes" / "quickstart.yaml"),
                          "sample.num_smaples=2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2
    assert "sample.num_smaples" in res.stderr and "unknown key" in res.stderr and "Traceback" not in res.stderr
