"""Iterated rounds: round r samples and trains from round r-1's merged policy, in round-<r>/."""

import hashlib
import json

import pytest
import torch

from alignkit.models import merge_adapter
from alignkit.recipe import load_recipe
from alignkit.runner import Runner
from alignkit.testing.chat_server import ChatServer


def hashed_verdict(body):
    """A deterministic verdict that varies with the answer text, so random answers still make pairs."""
    text = json.dumps(body["messages"][-1]["content"])
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    return {"rationale": "hash-based fixture verdict", "hallucination": h % 11, "correctness": (h // 11) % 11}


@pytest.mark.slow
def test_two_rounds_chain_policies_and_rerun_skips(tmp_path, tiny_qwen_dir, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"""\
output_dir: {tmp_path / 'run'}
rounds: 2
stages: [prompts, sample, judge, pairs, train, eval]
policy: {{model: {tiny_qwen_dir}}}
data: {{synthetic: {{num_prompts: 4, seed: 3}}}}
sample: {{backend: transformers, num_samples: 3, max_new_tokens: 8}}
judge: {{backend: openai, model: fixture}}
train: {{max_steps: 1, batch_size: 2}}
eval: {{synthetic: {{num_prompts: 4, seed: 9}}, max_new_tokens: 8, judge: false}}
""")
    with ChatServer(reply=hashed_verdict) as server:
        overrides = [f"judge.base_url={server.url}"]
        import os

        os.environ.setdefault("OPENAI_API_KEY", "sk-fixture")
        results = Runner(load_recipe(recipe_file, overrides)).run()
        run = tmp_path / "run"
        assert (run / "train" / "merged" / "config.json").is_file()
        assert (run / "round-2" / "train" / "adapter" / "adapter_config.json").is_file()
        assert {"sample@round-2", "train@round-2", "eval@round-2"} <= results.keys()
        round2 = [json.loads(l) for l in (run / "round-2" / "samples.jsonl").read_text().splitlines()]
        assert len(round2) == 12 and all(str(run / "train" / "merged") in s["policy"] for s in round2)
        state = json.loads((run / "stages.json").read_text())
        assert {"merge@round-1", "eval:round-1", "eval:round-2", "judge@round-2"} <= state.keys()
        assert all(v["status"] == "done" for v in state.values())
        sent = len(server.chat_requests)

        capsys.readouterr()
        Runner(load_recipe(recipe_file, overrides)).run()
        out = capsys.readouterr().out
        assert len(server.chat_requests) == sent
        # every stage is up to date (their cached sub-steps, eval:* and score:*, are not even visited)
        assert all(f"{key}: up to date, skipped" in out for key in state if ":" not in key)
        assert json.loads((run / "stages.json").read_text()) == state  # nothing ran again
        assert '"seconds"' not in out  # no stage ran (a finished stage prints its summary)


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_qwen_dir):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from alignkit.models import lora_config

    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    config = lora_config(4, 8)
    config.init_lora_weights = False  # random B, so the adapter changes the outputs
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(str(tiny_qwen_dir), str(tmp_path / "adapter"), tmp_path / "merged")

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with_adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir),
                                             tmp_path / "adapter")
    plain = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    expected = with_adapter(input_ids=ids).logits
    assert not torch.allclose(expected, plain(input_ids=ids).logits, atol=1e-4)
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_merged_model_keeps_base_dtype(tmp_path, tiny_qwen_dir):
    """A bf16 base merges in float32 but is saved in bf16, so the merged policy is not twice its size."""
    import shutil

    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from alignkit.models import lora_config

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_qwen_dir, bf16)
    AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir).to(torch.bfloat16).save_pretrained(bf16)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir)
    get_peft_model(base, lora_config(4, 8)).save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(str(bf16), str(tmp_path / "adapter"), tmp_path / "merged")
    assert {t.dtype for t in load_file(merged_dir / "model.safetensors").values()} == {torch.bfloat16}
