"""SFT: completion-only labels, padding, a short run that saves a loadable model, and resume."""

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from alignkit.models.inputs import collate, encode
from alignkit.records import Prompt, load_image, write_jsonl
from alignkit.sample.templates import load_template
from alignkit.train import sft as sft_module
from alignkit.train.config import SftConfig
from alignkit.train.sft import read_sft_file, train_sft
from alignkit.worlds.shapes import make_shapes_prompts, perceived_answer, sft_examples


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    prompts = make_shapes_prompts(d, 8, seed=3)
    return write_jsonl(d / "sft.jsonl", sft_examples(prompts, load_template("cot"), 0.5, seed=3))


def test_perceived_answer_error_model():
    prompt = Prompt("p", "How many shapes are in the image?", [], "count", "2", ["red square", "blue circle"])
    r, a, h = perceived_answer(prompt, random.Random(0), 0.0)
    assert (r, a, h) == ("I see 2 shapes: a red square and a blue circle.", "2", False)
    r, a, h = perceived_answer(prompt, random.Random(0), 1.0)
    assert h and a == "3" and r.startswith("I see 3 shapes:")
    absent = Prompt("q", "Is there a green circle in the image?", [], "exists", "no", ["red square"])
    assert perceived_answer(absent, random.Random(0), 1.0)[1] == "yes"  # the yes-bias POPE measures
    assert perceived_answer(absent, random.Random(0), 1.0, yes_bias=0.0)[1] == "no"  # another absent object
    assert "green circle" not in perceived_answer(absent, random.Random(0), 1.0, yes_bias=0.0)[0]


def test_exists_answer_first_opens_with_the_asked_object_and_its_answer():
    """The answer-first reasoning names the asked object and the answer of the listed scene before
    the list (a hallucinated object included); other question kinds are unchanged."""
    present = Prompt("p", "Is there a red square in the image?", [], "exists", "yes", ["red square", "blue circle"])
    r, a, _ = perceived_answer(present, random.Random(0), 0.0, exists_answer_first=True)
    assert (r, a) == ("A red square: yes. I see 2 shapes: a red square and a blue circle.", "yes")
    absent = Prompt("q", "Is there a green circle in the image?", [], "exists", "no", ["red square"])
    r, a, h = perceived_answer(absent, random.Random(0), 1.0, exists_answer_first=True)  # sees a green circle
    assert h and a == "yes" and r.startswith("A green circle: yes. I see 2 shapes: ")
    count = Prompt("c", "How many shapes are in the image?", [], "count", "1", ["red square"])
    assert perceived_answer(count, random.Random(0), 0.0, exists_answer_first=True)[0] == "I see 1 shape: a red square."


def test_yes_bias_sets_the_share_of_yes_answers(tmp_path):
    """Existence answers say "yes" to half the questions (present objects) plus, of the absent half,
    the hallucinated share that sees the asked object: 0.5 + 0.5 * error_rate * yes_bias. The answer
    always follows the listed scene."""
    prompts = make_shapes_prompts(tmp_path, 1200, seed=4, tasks=("exists",))
    for yes_bias, expected in ((1.0, 0.5 + 0.5 * 0.6), (0.5, 0.5 + 0.5 * 0.6 * 0.5), (0.0, 0.5)):
        rng = random.Random(yes_bias)
        answers = [perceived_answer(p, rng, 0.6, yes_bias) for p in prompts]
        share = sum(a == "yes" for _, a, _ in answers) / len(answers)
        assert abs(share - expected) < 0.05, (yes_bias, share)
        for p, (reasoning, answer, _) in zip(prompts, answers):
            asked = p.question.removeprefix("Is there a ").removesuffix(" in the image?")
            assert (answer == "yes") == (f"a {asked}" in reasoning)


def test_sft_examples_hallucinate_at_the_configured_rate(tmp_path):
    prompts = make_shapes_prompts(tmp_path, 400, seed=5)
    rows = sft_examples(prompts, load_template("cot"), 0.3, seed=5)
    share = sum(r["hallucinated"] for r in rows) / len(rows)
    assert 0.24 < share < 0.36
    assert rows[0]["completion"][0]["content"][0]["text"].splitlines()[-1].startswith("Answer: ")


def test_labels_cover_only_the_completion(tiny_qwen_dir, sft_file):
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    row = read_sft_file(sft_file)[0]
    enc = encode(processor, row["prompt"], [load_image(p) for p in row["images"]], row["completion"])
    target = enc["labels"][enc["labels"] != -100]
    text = processor.tokenizer.decode(target)
    completion = row["completion"][0]["content"][0]["text"]
    assert text.startswith(completion) and "<|im_end|>" in text
    assert "Describe" not in text and "<|image_pad|>" not in text


def test_collate_pads_right(tiny_qwen_dir, sft_file):
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    rows = read_sft_file(sft_file)
    encs = [encode(processor, r["prompt"], [load_image(p) for p in r["images"]], r["completion"]) for r in rows[:3]]
    batch = collate(encs, pad_id=processor.tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in encs]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in encs)


def test_missing_image_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": [], "completion": [], "images": ["nope.png"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: image not found"):
        read_sft_file(f)


@pytest.mark.slow
def test_train_saves_a_model_that_generates(tiny_qwen_dir, sft_file, tmp_path):
    cfg = SftConfig(data=str(sft_file), max_steps=3, batch_size=2, warmup_steps=1)
    out = train_sft(sft_file, tmp_path / "run", cfg, model=str(tiny_qwen_dir), logging_steps=1)
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    ids = processor(text=["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3).shape[1] > ids["input_ids"].shape[1]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "encoded").exists()


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_qwen_dir, sft_file, tmp_path, monkeypatch):
    cfg = SftConfig(data=str(sft_file), max_steps=4, batch_size=2, warmup_steps=1, save_steps=2)
    args = dict(model=str(tiny_qwen_dir), logging_steps=1)
    train_sft(sft_file, tmp_path / "straight", cfg, **args)
    straight = [json.loads(l)["loss"] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]

    calls = {"n": 0}
    real, real_encode = sft_module.collate, sft_module.encode

    def crash_on_fourth(batch, pad_id):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill after the step-2 checkpoint and step 3
        return real(batch, pad_id)

    monkeypatch.setattr(sft_module, "collate", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_sft(sft_file, tmp_path / "resumed", cfg, **args)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").exists()
    assert {p.suffix for p in (checkpoints / "checkpoint-2").iterdir()} == {".safetensors", ".json"}  # no pickle
    # the kill also cut a checkpoint and a metrics line short: both are ignored
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-3" / "weights.safetensors").write_bytes(b"\x00" * 10)
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')
    monkeypatch.setattr(sft_module, "collate", real)
    encoded = []  # the re-run reads the encodings the killed run left (sft/encoded), encoding none again
    monkeypatch.setattr(sft_module, "encode", lambda *a: encoded.append(a) or real_encode(*a))
    train_sft(sft_file, tmp_path / "resumed", cfg, **args)
    assert encoded == []
    lines = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    assert [l["loss"] for l in lines] == pytest.approx(straight, abs=1e-5)
    assert not (tmp_path / "resumed" / "checkpoints").exists() and not (tmp_path / "resumed" / "encoded").exists()


def test_sft_image_paths_outside_the_data_directory_are_refused_unless_allowed(tmp_path):
    from PIL import Image

    from alignkit.records import RecordError

    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    f = tmp_path / "data" / "sft.jsonl"
    row = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}],
           "images": ["../outside.png"]}  # fmt: skip
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"sft.jsonl:1: image path .* is outside .*sft.allow_outside_paths"):
        read_sft_file(f)
    assert read_sft_file(f, allow_outside_paths=True)[0]["images"] == [str((tmp_path / "outside.png").resolve())]


def test_sft_phases_merge_over_the_section_and_bad_phases_name_their_key(tmp_path):
    """`sft.phases`: each entry changes only its keys (`synthetic` key by key); a bad key names the
    entry; a LoRA phase that another phase would continue from is refused."""
    from alignkit.errors import RecipeError
    from alignkit.recipe import load_recipe

    section = {"synthetic": {"num_examples": 64, "tasks": ["exists"], "yes_bias": 0.0}, "max_steps": 30,
               "phases": [{"synthetic": {"tasks": ["describe", "count"]}, "learning_rate": 3e-4}]}  # fmt: skip
    first, second = SftConfig.model_validate(section).phase_configs()
    assert (first.synthetic.tasks, first.learning_rate, first.max_steps) == (["exists"], 1e-3, 30)
    assert (second.synthetic.tasks, second.learning_rate, second.max_steps) == (["describe", "count"], 3e-4, 30)
    assert (second.synthetic.num_examples, second.synthetic.yes_bias) == (64, 0.0)  # kept from the section
    assert SftConfig.model_validate({"synthetic": {}}).phase_configs()[0].phases == []

    recipe = tmp_path / "recipe.yaml"
    for phases, message in (
        ([{"learning_rate": -1}], r"sft: .*phases\[0\]\.learning_rate: Input should be greater than 0"),
        ([{}, {"max_step": 5}], r"phases\[1\]\.max_step: Extra inputs are not permitted"),
        ([{"synthetic": {"tasks": ["shout"]}}], r"phases\[0\]\.synthetic\.tasks\.0: Input should be"),
        ([{"phases": []}], r"phases\[0\]: a phase cannot have phases of its own"),
    ):
        recipe.write_text(yaml.safe_dump({"sft": section | {"phases": phases}}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe)
    with pytest.raises(ValueError, match=r"phases\[0\] trains a LoRA adapter, but the next phase starts from its model"):
        SftConfig.model_validate(section | {"phases": [{"finetune": "lora"}, {}]})
    SftConfig.model_validate(section | {"phases": [{"finetune": "lora"}]})  # the last phase may train an adapter


def test_each_phase_starts_from_the_last_and_a_rerun_redoes_only_changed_phases(tiny_qwen_dir, tmp_path):
    """Two SFT phases in the `sft` stage: the second trains the first's model (at a learning rate
    too small to move it, its weights are the first phase's, not the base model's); changing only the
    second phase re-runs only the second; sft/model is the last phase's."""
    from safetensors.torch import load_file

    from alignkit.recipe import Recipe
    from alignkit.runner import Runner

    def run(second_steps: int) -> Runner:
        runner = Runner(Recipe.model_validate({
            "output_dir": str(tmp_path / "run"), "policy": {"model": str(tiny_qwen_dir)}, "stages": ["sft"],
            "data": {"synthetic": {"num_prompts": 4}}, "sft": {"synthetic": {"num_examples": 8, "tasks": ["exists"]}, "max_steps": 3, "batch_size": 4,
                    "warmup_steps": 0, "phases": [{"synthetic": {"tasks": ["count"]}, "max_steps": second_steps,
                                                   "learning_rate": 1e-12}]},
        }))  # fmt: skip
        runner.run(["sft"])
        return runner

    runner = run(2)
    sft = runner.paths.sft
    base, first, last = (load_file(d / "model.safetensors") for d in (tiny_qwen_dir, sft / "phase-1" / "model", sft / "model"))
    name = "model.layers.0.mlp.up_proj.weight"  # the saved (hub) name
    assert not torch.equal(base[name], first[name])  # phase 1 trained
    assert torch.allclose(first[name], last[name], atol=1e-6)  # phase 2 started from phase 1's weights
    assert "how many" in (sft / "data.jsonl").read_text().lower() and "how many" not in (
        sft / "phase-1" / "data.jsonl").read_text().lower()  # fmt: skip
    state = json.loads(runner.paths.state.read_text())
    assert state["sft:phase-1"]["status"] == "done" and state["sft"]["summary"]["phases"] == 2

    phase_one = (sft / "phase-1" / "model" / "model.safetensors").stat().st_mtime_ns
    final = (sft / "model" / "model.safetensors").stat().st_mtime_ns
    run(3)
    assert (sft / "phase-1" / "model" / "model.safetensors").stat().st_mtime_ns == phase_one  # not redone
    assert (sft / "model" / "model.safetensors").stat().st_mtime_ns != final
    assert [json.loads(l)["step"] for l in (sft / "metrics.jsonl").read_text().splitlines()][-1] == 3
