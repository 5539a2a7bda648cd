"""Dataset adapters (`alignkit.data.formats`): small files in each public format, built here, read
into prompts and pairs counted by hand; bad rows name file and row; two recipe runs from an
RLAIF-V-schema parquet (through sample and judge, and straight to train)."""

from __future__ import annotations

import base64
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignkit.data.formats import read_prompts
from alignkit.data.preference import load_preference_dataset
from alignkit.errors import RecipeError, RecordError, StageInputError
from alignkit.pairs.imported import read_pairs
from alignkit.recipe import load_recipe
from alignkit.records import Prompt, read_records, write_jsonl
from alignkit.runner import Runner
from alignkit.testing.chat_server import ChatServer


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return buf.getvalue()


def _image_file(path, color: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(color))
    return path.name


# RLAIF-V's rows: rows 0 and 1 ask the same question of the same image (the dataset holds several
# pairs per prompt), so 4 rows are 3 prompts, 3 distinct images and 4 pairs.
RLAIF_ROWS = [
    ("red", "What is in the image?", "A red square.", "A blue circle."),
    ("red", "What is in the image?", "A red square on white.", "Two dogs."),
    ("blue", "Describe the picture.", "A blue field.", "A green field."),
    ("green", "What colour dominates?", "Green.", "Purple."),
]


def _rlaif_parquet(path, bad_image_row: int | None = None):
    rows = [
        {
            "ds_name": "fixture", "image": {"bytes": b"not a png" if i == bad_image_row else _png(color), "path": ""},
            "question": q, "chosen": c, "rejected": r, "origin_dataset": "fixture-src",
            "origin_split": json.dumps({"split": "train"}), "idx": i, "image_path": f"{color}.png",
        }
        for i, (color, q, c, r) in enumerate(RLAIF_ROWS)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# prompts from each format


def test_rlaif_v_parquet_gives_one_prompt_per_question_and_image(tmp_path):
    src = _rlaif_parquet(tmp_path / "rlaif.parquet")
    prompts = read_prompts(src, tmp_path / "images")
    assert [p.question for p in prompts] == ["What is in the image?", "Describe the picture.", "What colour dominates?"]
    assert len(list((tmp_path / "images").iterdir())) == 3  # each embedded image written once
    for p, color in zip(prompts, ["red", "blue", "green"]):
        (path,) = p.images
        assert Image.open(path).getpixel((0, 0)) == Image.new("RGB", (1, 1), color).getpixel((0, 0))
    assert len({p.prompt_id for p in prompts}) == 3
    assert read_prompts(src, tmp_path / "again") == [
        p.__class__(**{**p.__dict__, "images": [str(tmp_path / "again" / os.path.basename(p.images[0]))]})
        for p in prompts
    ]  # ids come from content: a second read (anywhere) gives the same ids


def test_llava_json_prompts_take_the_first_human_turn_and_the_answer_after_it(tmp_path):
    _image_file(tmp_path / "coco" / "a.png", "red")
    records = [
        {"id": "0", "image": "coco/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red tile."},
            {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "Small."}]},
        {"id": "1", "conversations": [{"from": "human", "value": "Tell a joke."}, {"from": "gpt", "value": "No."}]},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(records))
    first, second = read_prompts(tmp_path / "llava.json", tmp_path / "images")
    assert (first.question, first.reference_answer, first.images) == (
        "What is shown?", "A red tile.", [str(tmp_path / "coco" / "a.png")],
    )  # fmt: skip
    assert (second.question, second.reference_answer, second.images) == ("Tell a joke.", "No.", [])


def test_trl_prompt_only_and_sharegpt_prompts(tmp_path):
    _image_file(tmp_path / "a.png", "red")
    trl = _jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Count the shapes.", "images": ["a.png"]},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name the colour."}]}],
         "images": ["a.png"]},
    ])  # fmt: skip
    assert [(p.question, len(p.images)) for p in read_prompts(trl, tmp_path / "i")] == [
        ("Count the shapes.", 1), ("Name the colour.", 1),
    ]  # fmt: skip
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [
        {"messages": [{"role": "system", "content": "You see images."}, {"role": "user", "content": "<image>Which shape?"},
                      {"role": "assistant", "content": "A square."}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Which shape?<image>"}], "images": ["a.png"]},  # a repeat: one prompt
    ])  # fmt: skip
    (p,) = read_prompts(sharegpt, tmp_path / "i")
    assert (p.question, p.reference_answer, p.images) == ("Which shape?", "A square.", [str(tmp_path / "a.png")])


def test_vlfeedback_prompts_read_img_path(tmp_path):
    src = _vlfeedback(tmp_path)
    prompts = read_prompts(src, tmp_path / "i")
    assert [p.question for p in prompts] == ["Describe the image.", "What is red here?", "Is there a cat?"]
    assert prompts[0].images == [str(tmp_path / "img" / "v0.png")]


def test_alignkit_prompts_keep_their_ids_and_a_format_can_be_named(tmp_path):
    _image_file(tmp_path / "a.png", "red")
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt_id": "mine", "question": "Q?", "image": "a.png", "task": "count"}])
    (p,) = read_prompts(src, tmp_path / "i")
    assert (p.prompt_id, p.task) == ("mine", "count")
    (q,) = read_prompts(src, tmp_path / "i", format="alignkit")
    assert q == p
    with pytest.raises(RecordError, match=r"p\.jsonl: the llava format needs column\(s\) \['conversations'\]; found "):
        read_prompts(src, tmp_path / "i", format="llava")


# ---------------------------------------------------------------------------------------------
# pairs


def _vlfeedback(tmp_path):
    """Three VLFeedback records. Means by hand: record 0: A (5+4+5)/3, B (2+1+5)/3, C (3+4)/2 with
    its "N/A" left out -> A against B, margin 2.0; record 1: every completion 3 -> no pair; record 2
    (completions as a record of lists, as `datasets` stores them): 4.5 against 2.0, margin 2.5."""
    for i, color in enumerate(["red", "blue", "green"]):
        _image_file(tmp_path / "img" / f"v{i}.png", color)

    def ann(h, vf, e):
        return {"Helpfulness": {"Rating": h, "Rationale": "helpful"}, "Visual Faithfulness": {"Rating": vf, "Rationale": "vf"},
                "Ethical Considerations": {"Rating": e, "Rationale": "ok"}}  # fmt: skip

    records = [
        {"id": "v0", "prompt": "Describe the image.", "img_path": "img/v0.png", "models": ["a", "b", "c"],
         "completions": [{"model": "a", "response": "A red square.", "annotations": ann("5", "4", "5")},
                         {"model": "b", "response": "A dog.", "annotations": ann("2", "1", "5")},
                         {"model": "c", "response": "Red.", "annotations": ann("3", "N/A", "4")}]},
        {"id": "v1", "prompt": "What is red here?", "img_path": "img/v1.png", "models": ["a", "b"],
         "completions": [{"model": "a", "response": "Nothing.", "annotations": ann("3", "3", "3")},
                         {"model": "b", "response": "A box.", "annotations": ann("3", "3", "3")}]},
        {"id": "v2", "prompt": "Is there a cat?", "img_path": "img/v2.png", "models": ["a", "b"],
         "completions": {"model": ["a", "b"], "response": ["Yes, a cat.", "No."],
                         "annotations": [ann("2", "1", "3"), ann("5", "4", "4.5")]}},
    ]  # fmt: skip
    path = tmp_path / "vlfeedback.json"
    path.write_text(json.dumps(records))
    return path


def test_vlfeedback_pairs_best_against_worst_by_mean_rating(tmp_path):
    pairs, summary = read_pairs(_vlfeedback(tmp_path), tmp_path / "i")
    assert summary["format"] == "vlfeedback" and summary["num_pairs"] == 2
    assert summary["skipped"] == {"rows whose completions are all rated the same": 1}
    first, second = pairs
    assert (first.chosen[0]["content"][0]["text"], first.rejected[0]["content"][0]["text"]) == (
        "A red square.",
        "A dog.",
    )
    assert first.chosen_score == pytest.approx(14 / 3) and first.rejected_score == pytest.approx(8 / 3)
    assert first.margin == pytest.approx(2.0)
    assert "Visual Faithfulness: 1" in first.rejected_rationale
    assert (second.chosen[0]["content"][0]["text"], second.rejected[0]["content"][0]["text"]) == ("No.", "Yes, a cat.")
    assert (second.chosen_score, second.rejected_score, second.margin) == (4.5, 2.0, 2.5)
    assert first.prompt == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]


def test_rlaif_v_pairs_share_prompt_ids_with_its_prompts_and_load_for_training(tmp_path):
    src = _rlaif_parquet(tmp_path / "rlaif.parquet")
    pairs, summary = read_pairs(src, tmp_path / "images")
    assert (summary["format"], summary["num_pairs"], summary["prompts_with_pairs"]) == ("rlaif-v", 4, 3)
    assert [p.chosen[0]["content"][0]["text"] for p in pairs] == [c for _, _, c, _ in RLAIF_ROWS]
    assert all((p.margin, p.chosen_score, p.rejected_score) == (1.0, 1.0, 0.0) for p in pairs)
    prompts = read_prompts(src, tmp_path / "images")
    assert [p.prompt_id for p in pairs] == [prompts[i].prompt_id for i in (0, 0, 1, 2)]
    assert len(list((tmp_path / "images").iterdir())) == 3
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ds = load_preference_dataset(tmp_path / "pairs.jsonl", keep={"margin": (int, float)})
    assert ds.num_rows == 4 and ds[2]["images"][0].getpixel((0, 0)) == (0, 0, 255)


def test_trl_preference_pairs_keep_conversations_and_scores(tmp_path):
    _image_file(tmp_path / "a.png", "red")
    src = _jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}],
         "chosen": [{"role": "assistant", "content": "Square."}], "rejected": [{"role": "assistant", "content": "Circle."}],
         "images": ["a.png"], "score_chosen": 8.0, "score_rejected": 3.5},
        {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]},  # a repeat
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes.", "images": []},  # no preference
    ])  # fmt: skip
    pairs, summary = read_pairs(src, tmp_path / "i")
    assert summary["skipped"] == {"repeated pairs": 1, "rows whose chosen and rejected answers are the same": 1}
    first, second = pairs
    assert first.prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert second.prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]}]
    assert second.chosen == [{"role": "assistant", "content": [{"type": "text", "text": "Square."}]}]
    assert (second.chosen_score, second.rejected_score, second.margin) == (8.0, 3.5, 4.5)


# ---------------------------------------------------------------------------------------------
# bad input


def test_unknown_columns_name_the_file_and_the_columns_found(tmp_path):
    src = _jsonl(tmp_path / "odd.jsonl", [{"text": "hi", "picture": "a.png"}])
    with pytest.raises(RecordError, match=r"odd\.jsonl: cannot tell its format from its columns \['picture', 'text'\]"):
        read_prompts(src, tmp_path / "i")


@pytest.mark.parametrize(
    ("name", "rows", "pattern"),
    [
        ("llava.jsonl", [{"conversations": [{"from": "gpt", "value": "Hi."}]}],
         r"llava\.jsonl:1: no user turn in the conversation"),
        ("llava2.jsonl", [{"conversations": [{"from": "human", "value": "Q?"}]},
                          {"conversations": [{"speaker": "human", "value": "Q?"}]}],
         r"llava2\.jsonl:2: conversations\[0\]: a message needs 'from'"),
        ("sharegpt.jsonl", [{"messages": [{"role": "user", "content": 7}]}],
         r"sharegpt\.jsonl:1: messages\[0\]: expected text or a list of content parts, got int"),
        ("trl.jsonl", [{"prompt": "   <image> "}], r"trl\.jsonl:1: empty question"),
        ("rlaif.jsonl", [{"question": "Q?", "chosen": "a", "rejected": "b", "image": {"path": "../../etc/x.png"}}],
         r"rlaif\.jsonl:1: image path '\.\./\.\./etc/x\.png' is outside"),
    ],
)  # fmt: skip
def test_a_bad_prompt_row_names_file_and_row(tmp_path, name, rows, pattern):
    with pytest.raises(RecordError, match=pattern):
        read_prompts(_jsonl(tmp_path / name, rows), tmp_path / "i")


def test_bad_pair_rows_name_file_and_row(tmp_path):
    with pytest.raises(
        RecordError, match=r"rlaif\.parquet row 2: the embedded image: not an image in an accepted format"
    ):
        read_pairs(_rlaif_parquet(tmp_path / "rlaif.parquet", bad_image_row=2), tmp_path / "i")
    prompt_only = _jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b"}, {"prompt": "Q2?"}]
    )
    with pytest.raises(RecordError, match=r"mixed\.jsonl:2: a prompt-only row"):
        read_pairs(prompt_only, tmp_path / "i")
    placeholders = _jsonl(tmp_path / "ph.jsonl", [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}],
                                                   "chosen": "a", "rejected": "b", "images": ["data:image/png;base64," + base64.b64encode(_png("red")).decode()]}])  # fmt: skip
    with pytest.raises(RecordError, match=r"ph\.jsonl:1: the prompt has 0 image placeholder\(s\) for 1 image\(s\)"):
        read_pairs(placeholders, tmp_path / "i")
    vlf = tmp_path / "vlf.json"
    vlf.write_text(json.dumps([{"prompt": "Q", "completions": "lots"}]))
    with pytest.raises(RecordError, match=r"vlf\.json record 0: 'completions' must be a list of records"):
        read_pairs(vlf, tmp_path / "i")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"}]}]))
    with pytest.raises(RecordError, match=r"llava\.json: llava records hold no preference pairs"):
        read_pairs(llava, tmp_path / "i")
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(RecordError, match=r"notjson\.json: not a valid JSON file"):
        read_pairs(tmp_path / "notjson.json", tmp_path / "i")


def test_a_hub_dataset_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """`hf:owner/name` reads what `datasets.load_dataset` cached, offline. The cache is laid out here
    as a Hub download leaves it (`owner___name/default/0.0.0/<hash>/name-train.arrow`)."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf-cache"
    builder = Parquet(cache_dir=str(cache), dataset_name="openbmb___rlaif-v-dataset", config_id="default",
                      hash="0123abcd", data_files={"train": str(_rlaif_parquet(tmp_path / "rlaif.parquet"))})  # fmt: skip
    builder.download_and_prepare()
    for f in cache.glob("openbmb___rlaif-v-dataset/default/0.0.0/0123abcd/openbmb___*"):
        f.rename(f.with_name(f.name.removeprefix("openbmb___")))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    offline = datasets.config.HF_HUB_OFFLINE
    prompts = read_prompts("hf:openbmb/RLAIF-V-Dataset", tmp_path / "images")
    assert prompts == read_prompts(tmp_path / "rlaif.parquet", tmp_path / "images")  # the same 3 prompts
    pairs, summary = read_pairs("hf:openbmb/RLAIF-V-Dataset:train", tmp_path / "images")
    assert summary["num_pairs"] == 4 and {p.prompt_id for p in pairs} == {p.prompt_id for p in prompts}
    assert datasets.config.HF_HUB_OFFLINE == offline  # the offline switch is put back
    with pytest.raises(RecordError, match=r"hf:openbmb/Missing: not in the local datasets cache"):
        read_prompts("hf:openbmb/Missing", tmp_path / "images")


def test_data_pairs_alone_is_a_valid_recipe_but_gives_no_prompts(tmp_path):
    _rlaif_parquet(tmp_path / "rlaif.parquet")
    (tmp_path / "r.yaml").write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{pairs: rlaif.parquet}}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.pairs == str(tmp_path / "rlaif.parquet")  # relative to the recipe file
    with pytest.raises(StageInputError, match=r"data\.pairs gives pairs, not prompts"):
        Runner(recipe).run(["prompts"])
    (tmp_path / "none.yaml").write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{format: llava}}\n")
    with pytest.raises(RecipeError, match=r"set exactly one of data\.prompts or data\.synthetic"):
        load_recipe(tmp_path / "none.yaml")


# ---------------------------------------------------------------------------------------------
# recipes from the RLAIF-V parquet


def _hashed_verdict(body):
    """A verdict that varies with the answer text, so a random tiny policy's answers still make pairs."""
    import hashlib

    h = int(hashlib.sha256(json.dumps(body["messages"][-1]["content"]).encode()).hexdigest(), 16)
    return {"rationale": "hash-based fixture verdict", "hallucination": h % 11, "correctness": (h // 11) % 11}


@pytest.mark.slow
def test_recipe_samples_judges_pairs_and_trains_from_rlaif_v_prompts(tmp_path, tiny_qwen_dir, monkeypatch):
    _rlaif_parquet(tmp_path / "rlaif.parquet")
    (tmp_path / "r.yaml").write_text(f"""\
output_dir: {tmp_path / "run"}
policy: {{model: {tiny_qwen_dir}}}
data: {{prompts: rlaif.parquet}}
sample: {{backend: transformers, num_samples: 3, max_new_tokens: 8}}
judge: {{backend: openai, model: fixture}}
train: {{max_steps: 2, batch_size: 2}}
""")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fixture")
    with ChatServer(reply=_hashed_verdict) as server:
        results = Runner(load_recipe(tmp_path / "r.yaml", [f"judge.base_url={server.url}"])).run()
        assert len(server.chat_requests) == 9  # 3 prompts x 3 samples, each judged once
    run = tmp_path / "run"
    assert results["prompts"]["num_prompts"] == 3
    prompts = {p.prompt_id: p for p in read_records(run / "prompts.jsonl", Prompt)}
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {p["prompt_id"] for p in pairs} <= prompts.keys()
    assert all(p["images"] == prompts[p["prompt_id"]].images for p in pairs)
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (run / "train" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_recipe_trains_on_the_rlaif_v_parquets_own_pairs(tmp_path, tiny_qwen_dir):
    _rlaif_parquet(tmp_path / "rlaif.parquet")
    (tmp_path / "r.yaml").write_text(f"""\
output_dir: {tmp_path / "run"}
stages: [pairs, train]
policy: {{model: {tiny_qwen_dir}}}
data: {{pairs: rlaif.parquet}}
train: {{max_steps: 2, batch_size: 2}}
""")
    results = Runner(load_recipe(tmp_path / "r.yaml")).run()
    assert results["pairs"]["num_pairs"] == 4 and results["pairs"]["format"] == "rlaif-v"
    run = tmp_path / "run"
    assert not (run / "samples.jsonl").exists() and not (run / "verdicts.jsonl").exists()
    assert (run / "train" / "adapter" / "adapter_config.json").is_file()
    first = (run / "stages.json").read_text()
    Runner(load_recipe(tmp_path / "r.yaml")).run()  # unchanged inputs: both stages skipped
    assert (run / "stages.json").read_text() == first
    pq.write_table(pq.read_table(tmp_path / "rlaif.parquet").slice(0, 3), tmp_path / "rlaif.parquet")
    results = Runner(load_recipe(tmp_path / "r.yaml")).run()  # the file changed: converted and trained again
    assert results["pairs"]["num_pairs"] == 3 and len((run / "pairs.jsonl").read_text().splitlines()) == 3
