"""Published benchmarks from their own file layouts (POPE, COCO CHAIR, AMBER, MMHal-Bench), and the
reference judge's vocabulary (`judge.vocabulary`).

Each test builds a tiny benchmark directory in the published layout (a few PIL images, 2-6
questions); metrics are checked against hand counts of known answers; the slow tests run
`alignkit eval` end to end with the tiny Qwen2-VL (MMHal-Bench judged through the local fixture server).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from alignkit import stats
from alignkit.cli import app
from alignkit.errors import RecipeError, RecordError
from alignkit.evaluate import compare, paired_tests
from alignkit.evaluate.benchmarks import judge_mmhal, load_prompts, score, score_mmhal
from alignkit.evaluate.config import EvalConfig
from alignkit.judge import JudgeConfig, run_judge
from alignkit.recipe import load_recipe
from alignkit.records import Prompt, Sample
from alignkit.testing.chat_server import ChatServer, heuristic_reply

KEY_ENV = "ALIGNKIT_TEST_BENCH_KEY"


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (48, 40), ("red", "blue", "green", "white")[i % 4]).save(folder / name)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# tiny benchmark directories, in each benchmark's published layout


def make_pope(root: Path) -> Path:
    """coco_pope_random.json (4 questions) and coco_pope_adversarial.json (3), COCO images in val2014/."""
    _images(root / "val2014", "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg")
    img = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    _write_jsonl(root / "coco_pope_random.json", [
        {"question_id": 1, "image": img[0], "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": img[0], "text": "Is there a car in the image?", "label": "no"},
        {"question_id": 3, "image": img[1], "text": "Is there a person in the image?", "label": "yes"},
        {"question_id": 4, "image": img[1], "text": "Is there a kite in the image?", "label": "no"},
    ])  # fmt: skip
    _write_jsonl(root / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": img[0], "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 2, "image": img[1], "text": "Is there a bench in the image?", "label": "yes"},
        {"question_id": 3, "image": img[1], "text": "Is there a bowl in the image?", "label": "no"},
    ])  # fmt: skip
    return root


def make_coco(root: Path) -> Path:
    """COCO's annotations/instances_val2014.json + captions_val2014.json and val2014/ (2 images)."""
    _images(root / "val2014", "COCO_val2014_000000000011.jpg", "COCO_val2014_000000000012.jpg")
    (root / "annotations").mkdir()
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 67, "name": "dining table"},
                  {"id": 3, "name": "car"}]  # fmt: skip
    instances = {
        "images": [{"id": 11, "file_name": "COCO_val2014_000000000011.jpg"},
                   {"id": 12, "file_name": "COCO_val2014_000000000012.jpg"}],
        "annotations": [{"id": 1, "image_id": 11, "category_id": 1}, {"id": 2, "image_id": 11, "category_id": 18},
                        {"id": 3, "image_id": 11, "category_id": 67}, {"id": 4, "image_id": 12, "category_id": 3}],
        "categories": categories,
    }  # fmt: skip
    captions = {"annotations": [{"image_id": 11, "caption": "A man and his puppy by a kitten."},
                                {"image_id": 12, "caption": "A red car on a street."}]}  # fmt: skip
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(captions))
    return root


def make_amber(root: Path) -> Path:
    """AMBER's data/ (annotations, relation, safe words, both query files) and image/ (2 images)."""
    data = root / "data"
    (data / "query").mkdir(parents=True)
    _images(root / "image", "AMBER_1.jpg", "AMBER_2.jpg")
    relation = {"sky": [], "grass": ["ground"], "dog": ["puppy"], "cloud": [], "tree": [], "car": [], "light": []}
    annotations = [
        {"id": 1, "type": "generative", "truth": ["sky", "grass", "dog"], "hallu": ["cloud", "tree"]},
        {"id": 2, "type": "generative", "truth": ["car"], "hallu": ["dog"]},
        {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "no"},
        {"id": 5, "type": "relation", "truth": "no"},
        {"id": 6, "type": "discriminative-hallucination", "truth": "no"},
    ]
    (data / "annotations.json").write_text(json.dumps(annotations))
    (data / "relation.json").write_text(json.dumps(relation))
    (data / "safe_words.txt").write_text("light\nrange\n")
    generative = [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i in (1, 2)]
    queries = ["Is there a sky in this image?", "Is the sky gloomy in this image?",
               "Is the dog on the grass in this image?", "Is there a cat in this image?"]  # fmt: skip
    discriminative = [{"id": i, "image": "AMBER_1.jpg", "query": q} for i, q in zip((3, 4, 5, 6), queries)]
    (data / "query" / "query_generative.json").write_text(json.dumps(generative))
    (data / "query" / "query_discriminative.json").write_text(json.dumps(discriminative))
    return root


MMHAL_TYPES = ["attribute", "adversarial", "comparison", "counting"]


def make_mmhal(root: Path) -> Path:
    """MMHal-Bench's response_template.json (4 questions) and images/ named by image_src."""
    _images(root / "images", "a1.jpg", "b2.jpg")
    template = [
        {"question_type": t, "question_topic": "outdoor", "image_id": f"id{i}",
         "image_src": f"https://example.org/photos/{'a1' if i % 2 == 0 else 'b2'}.jpg",
         "image_content": ["Tree", "Dog"], "question": f"Question q{i}: what is shown?",
         "gt_answer": "A dog under a tree.", "model_answer": ""}
        for i, t in enumerate(MMHAL_TYPES)
    ]  # fmt: skip
    (root / "response_template.json").write_text(json.dumps(template))
    return root


def _cfg(benchmark: str, path: Path, **kw) -> EvalConfig:
    return EvalConfig(benchmark=benchmark, path=str(path), **kw)


# ---------------------------------------------------------------------------------------------
# metrics against hand counts


def test_pope_per_split_metrics_match_a_hand_count(tmp_path):
    cfg = _cfg("pope", make_pope(tmp_path))
    prompts = load_prompts(cfg)
    assert [p.prompt_id for p in prompts][:2] == ["pope_random/1", "pope_random/2"] and len(prompts) == 7
    assert prompts[0].images == [str((tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").resolve())]
    answers = {
        # random: yes->yes (TP), no->"Yes" (FP), yes->"No, not really" (FN), no->"no" (TN)
        "pope_random/1": "Yes, there is.", "pope_random/2": "Yes", "pope_random/3": "No, not really.",
        "pope_random/4": "no",
        # adversarial: no->"There is no cat" (TN), yes->"yes" (TP), no->"I see one." (no yes/no: "yes", FP)
        "pope_adversarial/1": "There is no cat.", "pope_adversarial/2": "yes", "pope_adversarial/3": "I see one.",
    }  # fmt: skip
    out = score(cfg, prompts, answers)
    r, a = out["pope_random"], out["pope_adversarial"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1)
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert (a["tp"], a["fp"], a["tn"], a["fn"], a["neither"]) == (1, 1, 1, 0, 1)
    assert a["accuracy"] == pytest.approx(2 / 3) and a["precision"] == 0.5 and a["recall"] == 1.0
    assert a["f1"] == pytest.approx(2 / 3) and a["yes_ratio"] == pytest.approx(2 / 3)
    assert r["accuracy_ci"] == stats.wilson_interval(2, 4) and a["yes_ratio_ci"] == stats.wilson_interval(2, 3)
    assert "pope_popular" not in out  # only the splits present are scored
    assert set(out["outcomes"]["pope_random"]) == {f"pope_random/{i}" for i in range(1, 5)}


def test_coco_chair_uses_instances_and_captions_as_ground_truth(tmp_path):
    cfg = _cfg("coco_chair", make_coco(tmp_path))
    prompts = load_prompts(cfg)
    # image 11: person, dog, dining table (instances) + cat (the caption's "kitten"); image 12: car
    assert [(p.prompt_id, p.task, p.objects) for p in prompts] == [
        ("coco/11", "describe", ["cat", "dining table", "dog", "person"]), ("coco/12", "describe", ["car"]),
    ]  # fmt: skip
    answers = {
        "coco/11": "A woman feeds two puppies and a cat at the table; a bus waits outside.",  # bus: hallucinated
        "coco/12": "A car, a car again, and a truck next to a bicycle.",  # truck, bicycle: hallucinated
    }
    out = score(cfg, prompts, answers)["coco_chair"]
    # mentions: person, dog, cat, dining table, bus | car, car, truck, bicycle -> 3 of 9 hallucinated
    assert (out["mentions"], out["hallucinated_mentions"]) == (9, 3)
    assert out["chair_i"] == pytest.approx(3 / 9) and out["chair_s"] == 1.0
    assert out["chair_i_unique"] == pytest.approx(3 / 8)
    assert out["chair_s_ci"] == stats.wilson_interval(2, 2) and len(out["chair_i_ci"]) == 2


def test_amber_generative_and_discriminative_match_a_hand_count(tmp_path):
    cfg = _cfg("amber", make_amber(tmp_path))
    prompts = load_prompts(cfg)
    assert [(p.prompt_id, p.task) for p in prompts][:3] == [
        ("amber/1", "amber_generative"), ("amber/2", "amber_generative"), ("amber/3", "amber_discriminative"),
    ]  # fmt: skip
    answers = {
        # nouns: sky (truth), ground (grass's associated word: truth), clouds (hallu: hallucinated, Cog);
        # "light" is a safe word, "puppy" is not said: Cover 2 of 3
        "amber/1": "The sky above green ground, two clouds and a light.",
        "amber/2": "A car.",  # car: truth; Cover 1 of 1, nothing hallucinated
        "amber/3": "Yes, there is.",  # truth yes: TN (positive class "no")
        "amber/4": "No.",  # truth no: TP
        "amber/5": "Yes",  # truth no: FN
        "amber/6": "There is no cat.",  # truth no: TP
    }
    out = score(cfg, prompts, answers)
    g = out["amber_generative"]
    assert g["chair"] == pytest.approx(1 / 4) and g["cover"] == pytest.approx(3 / 4)
    assert g["hal"] == pytest.approx(1 / 2) and g["cog"] == pytest.approx(1 / 3)
    assert g["hal_ci"] == stats.wilson_interval(1, 2) and all(len(g[f"{k}_ci"]) == 2 for k in ("chair", "cover", "cog"))
    d = out["amber_discriminative"]
    # TP 2, FP 0, TN 1, FN 1: accuracy 3/4, precision 1, recall 2/3, F1 = 2PR/(P+R) (AMBER's inference.py)
    assert d["accuracy"] == 0.75 and d["precision"] == 1.0 and d["recall"] == pytest.approx(2 / 3)
    assert d["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))
    assert (
        out["amber_existence"]["accuracy"],
        out["amber_attribute"]["accuracy"],
        out["amber_relation"]["accuracy"],
    ) == (1.0, 1.0, 0.0)
    assert out["amber_existence"]["answers"] == 2


def _verdict(pid: str, rating: int | None) -> dict:
    if rating is None:
        return {"prompt_id": pid, "status": "failed", "scores": {}, "error": "invalid_verdict: no rating"}
    return {"prompt_id": pid, "status": "ok", "scores": {"rating": rating / 6}}


def test_mmhal_scores_match_a_hand_count(tmp_path):
    prompts = load_prompts(_cfg("mmhal", make_mmhal(tmp_path)))
    assert prompts[1].images == [str((tmp_path / "images" / "b2.jpg").resolve())]
    assert (prompts[0].reference_answer, prompts[0].objects) == ("A dog under a tree.", ["Tree", "Dog"])
    verdicts = {"mmhal/0": _verdict("mmhal/0", 6), "mmhal/1": _verdict("mmhal/1", 2),
                "mmhal/2": _verdict("mmhal/2", 4), "mmhal/3": _verdict("mmhal/3", None)}  # fmt: skip
    out = score_mmhal(prompts, verdicts, MMHAL_TYPES)["mmhal"]
    # ratings 6, 2, 4 and 0 for the failed verdict (as eval_gpt4.py): mean 3, below 3: two of four
    assert out["score"] == 3.0 and out["hallucination_rate"] == 0.5 and out["unrated"] == 1
    assert out["hallucination_rate_ci"] == stats.wilson_interval(2, 4)
    assert out["by_question_type"] == {"attribute": 6, "adversarial": 2, "comparison": 4, "counting": 0}


def test_benchmark_outcomes_give_paired_tests_in_compare(tmp_path):
    cfg = _cfg("pope", make_pope(tmp_path))
    prompts = load_prompts(cfg)
    before = score(cfg, prompts, {p.prompt_id: "yes" for p in prompts})
    after = score(cfg, prompts, {p.prompt_id: p.reference_answer for p in prompts})
    tests = paired_tests(before, after)
    assert tests["pope_random.accuracy"]["diff"] == 0.5 and "pope_adversarial.f1" in tests
    assert "pope_random.accuracy" in compare(before, after)


# ---------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize(("make", "benchmark", "remove", "expect"), [
    (make_pope, "pope", ["coco_pope_random.json", "coco_pope_adversarial.json"], "no POPE question file found"),
    (make_coco, "coco_chair", ["annotations/captions_val2014.json"], "captions_val2014.json: COCO captions file not found"),
    (make_amber, "amber", ["data/relation.json"], "relation.json: AMBER relation.json not found"),
    (make_amber, "amber", ["image/AMBER_2.jpg"], "query_generative.json: item 1: image"),
    (make_mmhal, "mmhal", ["response_template.json"], "response_template.json: MMHal-Bench response_template.json not found"),
    (make_mmhal, "mmhal", ["images"], "the benchmark's image folder not found (set eval.images"),
])  # fmt: skip
def test_a_missing_file_is_named(tmp_path, make, benchmark, remove, expect):
    import shutil

    make(tmp_path)
    for rel in remove:
        target = tmp_path / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(RecordError) as e:
        load_prompts(_cfg(benchmark, tmp_path))
    assert expect in str(e.value)


def test_malformed_records_name_the_file_and_line(tmp_path):
    make_pope(tmp_path)
    with (tmp_path / "coco_pope_random.json").open("a") as f:
        f.write(
            json.dumps({"question_id": 5, "image": "COCO_val2014_000000000001.jpg", "text": "?", "label": "maybe"})
            + "\n"
        )
    with pytest.raises(RecordError, match=r"coco_pope_random.json:5: label must be 'yes' or 'no', got 'maybe'"):
        load_prompts(_cfg("pope", tmp_path))
    make_amber(tmp_path / "amber")
    (tmp_path / "amber" / "data" / "annotations.json").write_text(
        json.dumps([{"id": 1, "type": "generative", "truth": ["sky"]}])
    )
    with pytest.raises(RecordError, match=r"annotations.json: item 0: required key 'hallu' missing"):
        load_prompts(_cfg("amber", tmp_path / "amber"))
    make_mmhal(tmp_path / "mmhal")
    (tmp_path / "mmhal" / "response_template.json").write_text('[{"question": ')
    with pytest.raises(RecordError, match=r"response_template.json: not valid JSON"):
        load_prompts(_cfg("mmhal", tmp_path / "mmhal"))


def test_recipe_keys_are_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{synthetic: {{num_prompts: 2}}}}\n")
    with pytest.raises(RecipeError, match="eval.benchmark=pope needs eval.path"):
        load_recipe(recipe, ["eval.benchmark=pope"])
    with pytest.raises(RecipeError, match="unset eval.prompts and eval.synthetic"):
        load_recipe(recipe, ["eval.benchmark=pope", f"eval.path={tmp_path}", "eval.synthetic.num_prompts=2"])
    with pytest.raises(RecipeError, match="eval.path and eval.images name a benchmark's files"):
        load_recipe(recipe, [f"eval.path={tmp_path}", "eval.synthetic.num_prompts=2"])


def test_mmhal_needs_an_llm_judge(tmp_path):
    cfg = _cfg("mmhal", make_mmhal(tmp_path))
    with pytest.raises(RecipeError, match="set judge.backend=openai and judge.model"):
        judge_mmhal(cfg, JudgeConfig(), load_prompts(cfg), tmp_path, fingerprint="f", cache_path=tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# judge.vocabulary


def test_the_reference_judge_reads_objects_with_judge_vocabulary(tmp_path):
    from alignkit.train.rewards import judge_reward

    prompt = Prompt("c1", "Describe the image.", [], "describe", None, ["dog", "dining table"])
    sample = Sample("c1#0", "c1", "Two puppies by the table and a cat.", "", "Two puppies by the table and a cat.",
                    True, 8, "stop")  # fmt: skip
    cfg = JudgeConfig(rubric="hallucination", vocabulary="coco")
    run_judge([prompt], [sample], tmp_path / "v.jsonl", cfg, fingerprint="f")
    verdict = json.loads((tmp_path / "v.jsonl").read_text())
    assert verdict["scores"]["hallucination"] == pytest.approx(1 / 3)  # dog, dining table ok; cat not in the image
    assert judge_reward(cfg, tmp_path / "cache.sqlite").fn([prompt], [sample]) == [pytest.approx(1 - 1 / 3)]
    shapes = JudgeConfig(rubric="hallucination")  # the shapes world reads no object in this text
    run_judge([prompt], [sample], tmp_path / "s.jsonl", shapes, fingerprint="f")
    assert json.loads((tmp_path / "s.jsonl").read_text())["scores"]["hallucination"] == 0.0


def test_a_judge_vocabulary_file_is_read_by_the_judge_stage(tmp_path):
    from test_fingerprints import _fingerprints, _inputs, _recipe_text

    _inputs(tmp_path)
    vocab = tmp_path / "vocab.yaml"
    vocab.write_text("objects: {cup: [mug]}\n")
    (tmp_path / "r.yaml").write_text(_recipe_text(tmp_path, "dpo"))
    recipe = load_recipe(tmp_path / "r.yaml", [f"judge.vocabulary={vocab}"])
    before = _fingerprints(recipe)
    vocab.write_text("objects: {cup: [mug, teacup]}\n")
    after = _fingerprints(recipe)
    assert [s for s in before if before[s] != after[s]] == ["judge", "eval"]  # eval judges its answers too


# ---------------------------------------------------------------------------------------------
# end to end: `alignkit eval` with the tiny model


def _rating_by_question(body: dict) -> dict | list[str]:
    """MMHal verdicts with a known rating per question ("q<i>" -> rating 2 * i), else the heuristic."""
    from alignkit.testing.chat_server import RecordedRequest

    text = RecordedRequest("POST", "", {}, body).text()
    if '"rating"' not in json.dumps(body.get("response_format", {})):
        return heuristic_reply(body)
    i = int(text.split("Question q", 1)[1][0])
    return {"rationale": f"Fixture rating for q{i}.", "rating": 2 * i}


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["pope", "coco_chair", "amber", "mmhal"])
def test_alignkit_eval_runs_each_benchmark(tmp_path, tiny_qwen_dir, monkeypatch, benchmark):
    make = {"pope": make_pope, "coco_chair": make_coco, "amber": make_amber, "mmhal": make_mmhal}[benchmark]
    root = make(tmp_path / "bench")
    judge = "judge: {backend: reference, vocabulary: coco}\n" if benchmark == "coco_chair" else ""
    (tmp_path / "r.yaml").write_text(
        f"output_dir: {tmp_path / 'run'}\npolicy: {{model: {tiny_qwen_dir}}}\ndata: {{synthetic: {{num_prompts: 2}}}}\n{judge}"
        f"eval: {{benchmark: {benchmark}, path: {root}, max_questions: 3, max_new_tokens: 4, batch_size: 4, "
        f"judge: {str(benchmark == 'coco_chair').lower()}}}\n"
    )  # fmt: skip
    args = ["eval", str(tmp_path / "r.yaml")]
    if benchmark == "mmhal":
        monkeypatch.setenv(KEY_ENV, "k")
        server = ChatServer(_rating_by_question).start()
        args += [
            "judge.backend=openai",
            "judge.model=judge-m",
            f"judge.base_url={server.url}",
            f"judge.api_key_env={KEY_ENV}",
        ]
    results_file = tmp_path / "run" / "eval" / "base" / "results.json"
    try:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        first = results_file.stat().st_mtime_ns
        assert CliRunner().invoke(app, args).exit_code == 0
        assert results_file.stat().st_mtime_ns == first  # unchanged files and settings: skipped
    finally:
        if benchmark == "mmhal":
            server.stop()
    results = json.loads(results_file.read_text())
    assert results["benchmark"] == benchmark
    keys = {"pope": ["pope_random", "pope_adversarial"], "coco_chair": ["coco_chair"],
            "amber": ["amber_generative", "amber_discriminative"], "mmhal": ["mmhal"]}[benchmark]  # fmt: skip
    for key in keys:
        assert results[key]["answers" if "answers" in results[key] else "total"] >= 2
        cis = [k for k in results[key] if k.endswith("_ci")]
        assert cis and all(0 <= results[key][k][0] <= results[key][k][1] <= 1 or k == "score_ci" for k in cis)
        assert set(results["outcomes"][key]) <= {json.loads(x)["prompt_id"] for x in
                                                 (tmp_path / "run" / "eval" / "base" / "answers.jsonl").read_text().splitlines()}  # fmt: skip
    if benchmark == "coco_chair":
        assert results["judge_score"] is not None  # judged by the reference judge with COCO's vocabulary
    if benchmark == "mmhal":  # questions q0..q2 rated 0, 2, 4 by the fixture judge: mean 2, two of three below 3
        assert results["mmhal"]["score"] == 2.0 and results["mmhal"]["hallucination_rate"] == pytest.approx(2 / 3)
        assert results["mmhal"]["by_question_type"] == {"attribute": 0, "adversarial": 2, "comparison": 4}
