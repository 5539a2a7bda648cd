"""Image ablation of the paths test_families.py does not cover: MM-DPO's reference log-prob cache,
eval with the transformers backend, and the OpenAI judge's request each change when only the image
changes (same ids, same file names, same text), so a path that drops the image, or a cache keyed
without it, fails here."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.models import tiny_model
from alignkit.records import Prompt, Sample

FAMILIES = ["tiny:qwen2-vl", "tiny:llava", "tiny:gemma3"]
QUESTION = "What shape is it?"


def _image(path: Path, color: str) -> str:
    """A square of `color` with a white corner, written to `path` (overwriting what was there)."""
    img = Image.new("RGB", (112, 112), color)
    img.paste((255, 255, 255), (0, 0, 37, 37))
    img.save(path)
    return str(path)


def _pairs(tmp_path: Path, color: str) -> Path:
    """Two pairs whose image files (fixed names) are painted `color`; everything else is fixed."""
    rows = [
        {"pair_id": f"p{i}", "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "chosen": [{"role": "assistant", "content": "A square."}],
         "rejected": [{"role": "assistant", "content": "A circle."}],
         "images": [_image(tmp_path / f"img{i}.png", color)], "margin": 1.0}
        for i in range(2)
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reference_logps(model_dir: str, pairs: Path, cache: Path, out_dir: Path) -> list[tuple[float, float]]:
    """MM-DPO's cached reference log-probs of each pair, through `MMDPOTrainer.cache_reference_logps`
    with the keys `train_mmdpo` computes."""
    from alignkit.data.preference import COLUMNS, load_preference_dataset
    from alignkit.models import load_policy, lora_config
    from alignkit.train.common import dpo_config
    from alignkit.train.config import TrainConfig
    from alignkit.train.mmdpo import MMDPOTrainer
    from alignkit.train.reference import pair_key, read_cache

    cfg = TrainConfig(method="mmdpo", batch_size=2)
    dataset = load_preference_dataset(pairs, keep={"pair_id": str})
    dataset = dataset.add_column("beta", [cfg.beta] * len(dataset))
    keys = [pair_key(*(row[c] for c in ("pair_id", *COLUMNS))) for row in dataset]
    policy, processor = load_policy(model_dir, dtype=torch.float32)
    trainer = MMDPOTrainer(model=policy, args=dpo_config(out_dir, cfg, seed=0, logging_steps=1), train_dataset=dataset,
                           processing_class=processor, peft_config=lora_config(model=policy))  # fmt: skip
    trainer.cache_reference_logps(cache, keys)
    cached = read_cache(cache)
    return [cached[key] for key in keys]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_logps_change_with_the_image(family_models, family, tmp_path):
    """The same pairs file (ids, text, image file names) with repainted images: the cache computes new
    reference log-probs (no stale hit) and they differ from the first image's; a re-run with the
    first images again is served from the cache with the first values."""
    model_dir, cache = str(tiny_model(family, cache_dir=family_models)), tmp_path / "ref.jsonl"
    red = _reference_logps(model_dir, _pairs(tmp_path, "red"), cache, tmp_path / "run")
    blue = _reference_logps(model_dir, _pairs(tmp_path, "blue"), cache, tmp_path / "run")
    assert len(cache.read_text().splitlines()) == 4  # two pairs x two images
    for (red_c, red_r), (blue_c, blue_r) in zip(red, blue):
        assert abs(red_c - blue_c) > 1e-4 and abs(red_r - blue_r) > 1e-4
    assert _reference_logps(model_dir, _pairs(tmp_path, "red"), cache, tmp_path / "run") == red
    assert len(cache.read_text().splitlines()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_answers_depend_on_the_image(family_models, family, tmp_path):
    """Eval's greedy answers (transformers backend) to one question: two prompts with the same image
    (different files) get the same answer, a prompt with another image a different one. Greedy
    decoding in one batch makes this deterministic, so a difference comes from the image alone."""
    from alignkit.evaluate import run_eval
    from alignkit.evaluate.config import EvalConfig

    prompts = [Prompt(pid, QUESTION, [_image(tmp_path / f"{pid}.png", color)])
               for pid, color in (("red", "red"), ("red-again", "red"), ("blue", "blue"))]  # fmt: skip
    cfg = EvalConfig(prompts="unused.jsonl", backend="transformers", max_new_tokens=12, temperature=0.0, batch_size=3)
    run_eval(prompts, tmp_path / "eval", cfg, fingerprint="f", model=str(tiny_model(family, cache_dir=family_models)))
    answers = {r["prompt_id"]: r["text"] for r in map(json.loads, (tmp_path / "eval" / "answers.jsonl").read_text().splitlines())}
    assert answers["red"] == answers["red-again"] != answers["blue"]


def test_judge_request_carries_the_image_and_a_new_image_is_no_cache_hit(tmp_path, monkeypatch):
    """The same answer judged twice with the verdict cache, the image file repainted in between: the
    second run sends a request (no cache hit) with the same text and the new image's pixels."""
    from alignkit.judge import run_judge
    from alignkit.judge.config import JudgeConfig
    from alignkit.testing.chat_server import ChatServer

    monkeypatch.setenv("ALIGNKIT_TEST_JUDGE_KEY", "sk-test")
    image = tmp_path / "img.png"
    prompts = [Prompt("p0", QUESTION, [str(image)], "describe", None, ["red square"])]
    samples = [Sample("p0#s0", "p0", "I see a square. Answer: square", "I see a square.", "square", True, 6, "stop")]
    counts = []
    with ChatServer() as srv:
        cfg = JudgeConfig(backend="openai", base_url=srv.url, api_key_env="ALIGNKIT_TEST_JUDGE_KEY", model="judge-m",
                          image_max_side=128)  # fmt: skip
        for color, run in (("red", "first"), ("blue", "second"), ("blue", "third")):
            _image(image, color)
            summary = run_judge(prompts, samples, tmp_path / f"{run}.jsonl", cfg, fingerprint=run,
                                cache_path=tmp_path / "cache.sqlite")  # fmt: skip
            assert summary["ok"] == 1
            counts.append((summary["requests"], summary["cached"]))
        first, second = srv.chat_requests
    assert counts == [(1, 0), (1, 0), (0, 1)]  # the repainted image is judged anew, then cached
    assert first.text() == second.text()

    def decoded(request) -> tuple[int, int, int]:
        (url,) = request.image_urls()
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").getpixel((100, 100))

    assert decoded(first)[0] > 200 > decoded(first)[2] and decoded(second)[2] > 200 > decoded(second)[0]
