"""Published hallucination benchmarks, read from a local directory laid out as each publishes it.

`eval.benchmark` picks one and `eval.path` names its directory; `eval.images` names the image
folder when it is elsewhere (e.g. your COCO val2014); `eval.max_questions` keeps the first N of each
file. Answers come from the usual eval sampling (`run_eval`); every rate has its 95% interval
(`_ci`) and per-answer `outcomes`, so `alignkit compare` runs paired tests on benchmarks too.

- `pope` (Li et al. 2023, github.com/RUCAIBox/POPE): `<path>/coco_pope_{random,popular,adversarial}.json`,
  one JSON object per line (`question_id`, `image`, `text`, `label` yes/no); every split present is
  scored, images in `<path>/val2014/`. Per split (`pope_random`, ...): accuracy, precision, recall,
  F1, yes-ratio, answers read as the POPE script reads them (`evaluate.pope_label`).
- `coco_chair` (Object HalBench-style CHAIR, Rohrbach et al. 2018; RLAIF-V's Object HalBench):
  COCO's `<path>/annotations/instances_<split>.json` and `captions_<split>.json`, images in
  `<path>/<split>/`. Each image is described (`DESCRIBE`), and CHAIR_i/CHAIR_s are counted with the
  COCO vocabulary against the image's ground truth as the published chair.py builds it: its
  annotated categories plus the COCO objects its reference captions name.
- `amber` (Wang et al. 2023, github.com/junyangwang0410/AMBER): `<path>/data/annotations.json`,
  `relation.json`, `safe_words.txt` and `query/query_generative.json` and/or
  `query/query_discriminative.json`, images in `<path>/image/`. Generative (`amber_generative`):
  CHAIR, Cover, Hal, Cog as AMBER's inference.py counts them, with its object list (relation.json)
  and safe words; one difference: nouns are found by exact word match (plurals folded), without the
  script's spaCy near-synonym step, so figures are close to, not identical with, published ones.
  Discriminative (`amber_discriminative`, and by dimension `amber_existence`, `amber_attribute`,
  `amber_relation`): accuracy, precision, recall, F1 with "no" as the positive class, as the script;
  a free-text answer is read as yes/no the way POPE reads it (the script needs exactly "Yes"/"No").
- `mmhal` (Sun et al. 2023, MMHal-Bench): `<path>/response_template.json` (question, image_src,
  image_id, gt_answer, image_content, question_type), images in `<path>/images/` under the file
  name of `image_src`. Scored by the recipe's judge endpoint (judge.backend=openai, any
  OpenAI-compatible model) with judges/mmhal.yaml (MMHal-Bench's 0-6 scale): the mean rating
  (`score`), `hallucination_rate` (share rated below 3) and the mean rating per question type; a
  verdict that failed counts as 0, as the benchmark's script counts an unparsed rating.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.errors import RecipeError, RecordError
from alignkit.evaluate import chair, evaluate_answers, pope, pope_row, rates
from alignkit.evaluate.config import EvalConfig
from alignkit.objects import Vocabulary, build_vocabulary, coco_vocabulary
from alignkit.records import Prompt, Sample, iter_jsonl, read_records

POPE_SPLITS = ("random", "popular", "adversarial")
# the coco_chair instruction (Object HalBench asks for a description in several wordings)
DESCRIBE = "Describe this image in detail."
# AMBER's discriminative types by dimension; every discriminative-attribute-* type is "attribute"
AMBER_DIMENSIONS = {"discriminative-hallucination": "existence", "discriminative-relation": "relation",
                    "relation": "relation"}  # fmt: skip
MMHAL_RATING = "rating"
MMHAL_SCALE = 6


# ---------------------------------------------------------------------------------------------
# files


def _root(cfg: EvalConfig) -> Path:
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise RecordError(f"{root}: eval.path is not a directory (eval.benchmark={cfg.benchmark})")
    return root


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RecordError(f"{path}: {what} not found")
    return path


def _coco_files(root: Path) -> tuple[Path, Path, str]:
    """(instances, captions, split) of a COCO annotations folder holding one split."""
    found = sorted((root / "annotations").glob("instances_*.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise RecordError(f"{root / 'annotations'}: {what} instances_<split>.json files found; coco_chair needs "
                          "exactly one (e.g. annotations/instances_val2014.json)")  # fmt: skip
    split = found[0].stem.removeprefix("instances_")
    return found[0], _need(root / "annotations" / f"captions_{split}.json", "COCO captions file"), split


def _amber_files(root: Path) -> dict[str, Path]:
    data = root / "data"
    names = {"annotations": "annotations.json", "relation": "relation.json", "safe_words": "safe_words.txt"}
    files = {key: _need(data / name, f"AMBER {name}") for key, name in names.items()}
    queries = {part: data / "query" / f"query_{part}.json" for part in ("generative", "discriminative")}
    present = {part: f for part, f in queries.items() if f.is_file()}
    if not present:
        raise RecordError(f"{data / 'query'}: no AMBER query file found (query_generative.json or "
                          "query_discriminative.json)")  # fmt: skip
    return files | present


def _pope_files(root: Path) -> dict[str, Path]:
    files = {s: root / f"coco_pope_{s}.json" for s in POPE_SPLITS}
    present = {s: f for s, f in files.items() if f.is_file()}
    if not present:
        raise RecordError(f"{root}: no POPE question file found (coco_pope_random.json, coco_pope_popular.json "
                          "or coco_pope_adversarial.json)")  # fmt: skip
    return present


def benchmark_files(cfg: EvalConfig) -> list[Path]:
    """The benchmark's question and annotation files (not its images): what eval's fingerprint reads."""
    root = _root(cfg)
    if cfg.benchmark == "pope":
        return list(_pope_files(root).values())
    if cfg.benchmark == "coco_chair":
        return list(_coco_files(root)[:2])
    if cfg.benchmark == "amber":
        return list(_amber_files(root).values())
    return [_need(root / "response_template.json", "MMHal-Bench response_template.json")]


def _images_dir(cfg: EvalConfig, default: Path) -> Path:
    images = Path(cfg.images) if cfg.images else default
    if not images.is_dir():
        raise RecordError(f"{images}: the benchmark's image folder not found (set eval.images to where they are)")
    return images


def _image(images: Path, name: object, where: str) -> str:
    path = images / Path(str(name)).name
    if not path.is_file():
        raise RecordError(f"{where}: image {path} not found")
    return str(path.resolve())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None


def _json_list(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RecordError(f"{path}: expected a JSON list of objects")
    return data


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if record.get(key) is None:
        raise RecordError(f"{where}: required key {key!r} missing")
    return record[key]


def _yes_no(value: object, where: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise RecordError(f"{where}: label must be 'yes' or 'no', got {value!r}")
    return label


def _first(items: list, cfg: EvalConfig) -> list:
    return items[: cfg.max_questions] if cfg.max_questions else items


# ---------------------------------------------------------------------------------------------
# prompts


def load_prompts(cfg: EvalConfig) -> list[Prompt]:
    """The benchmark's questions as prompts (images in place, by absolute path)."""
    root = _root(cfg)
    loader = {"pope": _pope_prompts, "coco_chair": _coco_prompts, "amber": _amber_prompts, "mmhal": _mmhal_prompts}
    prompts = loader[cfg.benchmark](cfg, root)
    seen: set[str] = set()
    for p in prompts:
        if p.prompt_id in seen:
            raise RecordError(f"{cfg.path}: question id {p.prompt_id.split('/')[-1]} appears twice ({p.prompt_id})")
        seen.add(p.prompt_id)
    return prompts


def _pope_prompts(cfg: EvalConfig, root: Path) -> list[Prompt]:
    images = _images_dir(cfg, root / "val2014")
    prompts = []
    for split, path in _pope_files(root).items():
        for lineno, rec in _first(list(iter_jsonl(path)), cfg):
            where = f"{path}:{lineno}"
            qid, image = _field(rec, "question_id", where), _field(rec, "image", where)
            prompts.append(Prompt(f"pope_{split}/{qid}", str(_field(rec, "text", where)), [_image(images, image, where)],
                                  "exists", _yes_no(_field(rec, "label", where), where)))  # fmt: skip
    return prompts


def coco_ground_truth(instances: dict[str, Any], captions: dict[str, Any], vocab: Vocabulary) -> dict[int, list[str]]:
    """Each image's objects as chair.py builds them: annotated categories plus objects its captions name."""
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    truth: dict[int, set[str]] = {img["id"]: set() for img in instances.get("images", [])}
    for ann in instances.get("annotations", []):
        if ann.get("image_id") in truth:
            name = names.get(ann.get("category_id"))
            if name is None:
                raise RecordError(
                    f"instances annotation {ann.get('id')}: unknown category_id {ann.get('category_id')!r}"
                )
            truth[ann["image_id"]].add(vocab.parse(name).object)
    for ann in captions.get("annotations", []):
        if ann.get("image_id") in truth:
            truth[ann["image_id"]].update(m.object for m in vocab.find(str(ann.get("caption", ""))))
    return {imid: sorted(objs) for imid, objs in truth.items()}


def _coco_prompts(cfg: EvalConfig, root: Path) -> list[Prompt]:
    instances_file, captions_file, split = _coco_files(root)
    instances, captions = _read_json(instances_file), _read_json(captions_file)
    for path, data in ((instances_file, instances), (captions_file, captions)):
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise RecordError(f"{path}: expected a COCO annotation file (an object with an `annotations` list)")
    if not isinstance(instances.get("images"), list):
        raise RecordError(f"{instances_file}: expected an `images` list")
    images = _images_dir(cfg, root / split)
    try:
        truth = coco_ground_truth(instances, captions, coco_vocabulary())
    except RecordError as e:
        raise RecordError(f"{instances_file}: {e}") from None
    return [
        Prompt(
            f"coco/{img['id']}",
            DESCRIBE,
            [_image(images, img.get("file_name"), f"{instances_file}: image {img['id']}")],
            "describe",
            None,
            truth[img["id"]],
        )
        for img in _first(instances["images"], cfg)
    ]


def _amber_prompts(cfg: EvalConfig, root: Path) -> list[Prompt]:
    files = _amber_files(root)
    annotations = _amber_annotations(files["annotations"])
    images = _images_dir(cfg, root / "image")
    prompts = []
    for part in ("generative", "discriminative"):
        if part not in files:
            continue
        for i, rec in enumerate(_first(_json_list(files[part]), cfg)):
            where = f"{files[part]}: item {i}"
            qid = _field(rec, "id", where)
            if qid not in annotations:
                raise RecordError(f"{where}: id {qid} has no entry in {files['annotations']}")
            if (annotations[qid]["type"] == "generative") != (part == "generative"):
                raise RecordError(f"{where}: id {qid} is a {annotations[qid]['type']!r} entry in "
                                  f"{files['annotations']}, not a {part} one")  # fmt: skip
            prompts.append(Prompt(f"amber/{qid}", str(_field(rec, "query", where)),
                                  [_image(images, _field(rec, "image", where), where)], f"amber_{part}"))  # fmt: skip
    return prompts


def _mmhal_prompts(cfg: EvalConfig, root: Path) -> list[Prompt]:
    path = _need(root / "response_template.json", "MMHal-Bench response_template.json")
    images = _images_dir(cfg, root / "images")
    prompts = []
    for i, rec in enumerate(_first(_json_list(path), cfg)):
        where = f"{path}: item {i}"
        content = _field(rec, "image_content", where)
        image = _image(images, _field(rec, "image_src", where), where)
        prompts.append(Prompt(f"mmhal/{i}", str(_field(rec, "question", where)), [image], "mmhal",
                              str(_field(rec, "gt_answer", where)), [str(c) for c in content]))  # fmt: skip
    return prompts


# ---------------------------------------------------------------------------------------------
# scores


def score(cfg: EvalConfig, prompts: list[Prompt], answers: dict[str, str]) -> dict:
    """The benchmark's metrics for the answers (MMHal-Bench's come from its judge: `judge_mmhal`)."""
    if cfg.benchmark == "pope":
        return score_pope(prompts, answers)
    if cfg.benchmark == "coco_chair":
        results = evaluate_answers(prompts, answers, coco_vocabulary())
        return {"num_prompts": len(prompts), "coco_chair": results.get("describe", chair([], [], coco_vocabulary())),
                "outcomes": {"coco_chair": results["outcomes"].get("describe", {})}}  # fmt: skip
    if cfg.benchmark == "amber":
        files = _amber_files(_root(cfg))
        return score_amber(prompts, answers, _amber_annotations(files["annotations"]),
                           _amber_relation(files["relation"]), _amber_safe_words(files["safe_words"]))  # fmt: skip
    return {"num_prompts": len(prompts), "outcomes": {}}


def score_pope(prompts: list[Prompt], answers: dict[str, str]) -> dict:
    """POPE's metrics per split, from prompts whose id is `pope_<split>/<question_id>`."""
    results: dict = {"num_prompts": len(prompts)}
    outcomes: dict[str, dict[str, list[int]]] = {}
    for split in POPE_SPLITS:
        task = f"pope_{split}"
        items = [(p, answers[p.prompt_id]) for p in prompts if p.prompt_id.startswith(task + "/")]
        if items:
            results[task] = pope([a for _, a in items], [str(p.reference_answer) for p, _ in items])
            outcomes[task] = {p.prompt_id: pope_row(a, str(p.reference_answer)) for p, a in items}
    return results | {"outcomes": outcomes}


def _amber_annotations(path: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for i, rec in enumerate(_json_list(path)):
        where = f"{path}: item {i}"
        kind = _field(rec, "type", where)
        truth = _field(rec, "truth", where)
        if kind == "generative":
            if not isinstance(truth, list) or not isinstance(_field(rec, "hallu", where), list):
                raise RecordError(f"{where}: a generative entry needs `truth` and `hallu` lists of objects")
        else:
            _yes_no(truth, where)
        out[_field(rec, "id", where)] = rec
    return out


def _amber_relation(path: Path) -> dict[str, list[str]]:
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise RecordError(f"{path}: expected an object mapping each object word to a list of associated words")
    return data


def _amber_safe_words(path: Path) -> frozenset[str]:
    return frozenset(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())


def amber_vocabulary(relation: dict[str, list[str]]) -> Vocabulary:
    """AMBER's object list (relation.json's words and their associated words), each word its own object."""
    words = dict.fromkeys([w for k, vs in relation.items() for w in [k, *vs]])
    return build_vocabulary("amber", {w: [] for w in words})


def _owner(noun: str, objects: list[str], relation: dict[str, list[str]]) -> int | None:
    """The index of the annotated object a noun stands for: first through an object's associated
    words, then the objects themselves, in the order inference.py searches them (None: neither)."""
    for owner, obj in [*((i, w) for i, o in enumerate(objects) for w in relation.get(o, [])), *enumerate(objects)]:
        if obj == noun:
            return owner
    return None


def amber_generative_row(
    text: str,
    truth: list[str],
    hallu: list[str],
    relation: dict[str, list[str]],
    safe: frozenset[str],
    vocab: Vocabulary,
) -> list[int]:
    """One description's counts, as `COLUMNS["amber"]`: object nouns not among safe words; those not
    standing for an object in the image are hallucinated; which truth objects (Cover) and which
    annotated hallucination-prone objects (Cog) the description names."""
    nouns = [m.object for m in vocab.find(text) if m.object not in safe]
    covered, cog, bad = set(), set(), 0
    for noun in nouns:
        if (i := _owner(noun, truth, relation)) is not None:
            covered.add(i)
            continue
        bad += 1
        if (j := _owner(noun, hallu, relation)) is not None:
            cog.add(j)
    return [1, len(nouns), bad, len(truth), len(covered), len(hallu), len(cog), int(bad > 0)]


def amber_discriminative_row(prediction: str, label: str) -> list[int]:
    """One yes/no answer's confusion counts with "no" as the positive class, as `COLUMNS["amber_d"]`."""
    _, tp, fp, tn, fn = pope_row(prediction, label)  # "yes" positive: swap the classes
    return [1, tn, fn, tp, fp]


def score_amber(
    prompts: list[Prompt], answers: dict[str, str], annotations: dict[int, dict[str, Any]],
    relation: dict[str, list[str]], safe: frozenset[str],
) -> dict:  # fmt: skip
    """AMBER's generative metrics (CHAIR, Cover, Hal, Cog) and discriminative ones overall and by dimension."""
    vocab = amber_vocabulary(relation)
    outcomes: dict[str, dict[str, list[int]]] = {}
    for p in prompts:
        ann = annotations[int(p.prompt_id.split("/", 1)[1])]
        if p.task == "amber_generative":
            row = amber_generative_row(answers[p.prompt_id], ann["truth"], ann["hallu"], relation, safe, vocab)
            outcomes.setdefault("amber_generative", {})[p.prompt_id] = row
        else:
            row = amber_discriminative_row(answers[p.prompt_id], ann["truth"])
            dim = AMBER_DIMENSIONS.get(ann["type"], "attribute")
            for task in ("amber_discriminative", f"amber_{dim}"):
                outcomes.setdefault(task, {})[p.prompt_id] = row
    results: dict = {"num_prompts": len(prompts)}
    for task in ("amber_generative", "amber_discriminative", "amber_existence", "amber_attribute", "amber_relation"):
        if task in outcomes:
            rows = list(outcomes[task].values())
            kind = "amber" if task == "amber_generative" else "amber_d"
            results[task] = rates(kind, rows) | {"answers": len(rows)}
    return results | {"outcomes": outcomes}


def mmhal_rating(verdict: dict[str, Any]) -> int:
    """A verdict's 0-6 rating; 0 for a failed one (as MMHal-Bench's script scores an unparsed reply)."""
    if verdict.get("status") != "ok":
        return 0
    return round(float(verdict["scores"][MMHAL_RATING]) * MMHAL_SCALE)  # stored normalised to [0, 1]


def score_mmhal(prompts: list[Prompt], verdicts: dict[str, dict[str, Any]], question_types: list[str]) -> dict:
    """The mean rating (`score`, 0-6), the share rated below 3 (`hallucination_rate`), both with
    intervals, and the mean rating per question type; `verdicts` by prompt_id."""
    rows: dict[str, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    for p in prompts:
        rating = mmhal_rating(verdicts.get(p.prompt_id, {}))
        rows[p.prompt_id] = [1, rating, int(rating < 3)]
        by_type.setdefault(question_types[int(p.prompt_id.split("/", 1)[1])], []).append(rating)
    unrated = sum(verdicts.get(p.prompt_id, {}).get("status") != "ok" for p in prompts)
    mmhal = rates("mmhal", list(rows.values())) | {"answers": len(rows), "unrated": unrated}
    mmhal["by_question_type"] = {t: sum(r) / len(r) for t, r in by_type.items()}
    return {"mmhal": mmhal, "outcomes": {"mmhal": rows}}


def judge_mmhal(cfg: EvalConfig, judge: Any, prompts: list[Prompt], out_dir: Path, *, fingerprint: str,
                cache_path: Path) -> dict:  # fmt: skip
    """MMHal-Bench's scores: the answers in `out_dir/answers.jsonl` rated 0-6 by the recipe's judge
    endpoint with judges/mmhal.yaml (verdicts in `out_dir/verdicts.jsonl`, resumable and cached)."""
    from alignkit.judge import run_judge

    if judge.backend != "openai":
        raise RecipeError("eval.benchmark=mmhal is scored by an LLM judge: set judge.backend=openai and "
                          "judge.model (any OpenAI-compatible endpoint, judge.base_url)")  # fmt: skip
    answers = read_records(out_dir / "answers.jsonl", Sample)
    run_judge(prompts, answers, out_dir / "verdicts.jsonl", judge.model_copy(update={"rubric": "mmhal"}),
              fingerprint=fingerprint, cache_path=cache_path)  # fmt: skip
    by_prompt = {v["prompt_id"]: v for _, v in iter_jsonl(out_dir / "verdicts.jsonl")}
    template = _json_list(benchmark_files(cfg)[0])
    types = [str(r.get("question_type", "unknown")) for r in template]
    return score_mmhal(prompts, by_prompt, types)
