"""Object vocabularies: COCO with CHAIR's synonyms and chair.py's rules, the shapes world, user YAML files."""

import pytest

from alignkit.errors import RecipeError, RecordError
from alignkit.evaluate import chair, evaluate_answers
from alignkit.judge.reference import hallucination
from alignkit.objects import Mention, coco_vocabulary, load_vocabulary, plurals
from alignkit.records import Prompt, Sample


@pytest.fixture(scope="module")
def coco():
    return coco_vocabulary()


def _names(vocab, text: str) -> list[str]:
    return [m.name for m in vocab.find(text)]


def test_coco_has_its_80_categories_each_read_as_itself(coco):
    assert len(coco.objects) == 80
    assert coco.objects[:3] == ("person", "bicycle", "car") and coco.objects[-1] == "toothbrush"
    assert all(coco.parse(name) == Mention(name) for name in coco.objects)


def test_coco_synonyms_and_plurals(coco):
    assert _names(coco, "Two puppies chase a kitten past some bikes.") == ["dog", "cat", "bicycle"]
    assert _names(coco, "Men, women and children; people with knives.") == ["person"] * 4 + ["knife"]
    assert _names(coco, "A sofa, some wine glasses and two cellphones.") == ["couch", "wine glass", "cell phone"]


def test_coco_two_word_objects_are_one_mention(coco):
    # chair.py joins its double words before reading single words: no dog in "hot dog", no bear in "teddy bear"
    assert _names(coco, "A hot dog next to a teddy bear.") == ["hot dog", "teddy bear"]
    assert _names(coco, "Hot dogs and teddy bears.") == ["hot dog", "teddy bear"]  # plurals of the phrase
    assert _names(coco, "A dog and a bear.") == ["dog", "bear"]
    assert _names(coco, "a hot-dog") == []  # one token, as nltk's tokenizer keeps hyphenated words


def test_coco_dining_table_is_one_mention_as_in_chair_py(coco):
    # chair.py has no "dining table" double word: "dining" is no object and "table" is the synonym of
    # dining table, so "dining table", "dining room table" and "table" are each one mention
    assert _names(coco, "a dining table") == ["dining table"]
    assert _names(coco, "a dining room table, two tables and a desk") == ["dining table"] * 3


def test_coco_rules_of_chair_py(coco):
    assert _names(coco, "A baby elephant and an adult giraffe.") == ["elephant", "giraffe"]  # not a person
    assert _names(coco, "A baby in a stroller.") == ["person"]
    assert _names(coco, "Passenger jets near a passenger train.") == ["airplane", "train"]  # no passenger
    assert _names(coco, "The toilet seat is up; a seat by the sink.") == ["toilet", "sink"]  # seat dropped
    assert _names(coco, "A seat by the sink.") == ["chair", "sink"]
    assert _names(coco, "A batter at home plate near the train tracks.") == []  # phrases that name nothing
    assert _names(coco, "A bow tie.") == ["tie"]


def test_coco_keeps_the_published_lists_quirks(coco):
    # chair.py splits synonyms.txt on ", ": " motor bike" (double space before it) never matches, yet
    # "motor bike" is a double word, so neither it nor its "bike" counts; "iPhone" never matches lower case
    assert _names(coco, "a motor bike") == []
    assert _names(coco, "a motor cycle and a motorbike") == ["motorcycle", "motorcycle"]
    assert _names(coco, "an iPhone and a smartphone") == ["cell phone"]


def test_chair_on_coco_captions_by_hand(coco):
    captions = [
        "A man riding a motorcycle past a dog, two more dogs and a hot dog stand.",
        "A teddy bear on a dining table beside a cup; the table also holds a bear.",
        "Passengers wait for a passenger train.",
        "A cat sleeping on a couch.",
    ]
    gold = [["person", "motorcycle"], ["teddy bear", "dining table", "cup"], ["train"], ["cat", "couch"]]
    out = chair(captions, gold, coco)
    # every mention: person motorcycle dog dog hot-dog (3 bad) | teddy-bear table cup table bear (1 bad)
    #                | person train (1 bad) | cat couch (0 bad)  -> 14 mentions, 5 hallucinated
    # unique:        4 (2 bad) | 4 (1 bad) | 2 (1 bad) | 2 (0 bad) -> 12, 4; CHAIR_s 3/4
    assert (out["mentions"], out["hallucinated_mentions"]) == (14, 5)
    assert (out["unique_mentions"], out["unique_hallucinated_mentions"]) == (12, 4)
    assert out["chair_i"] == pytest.approx(5 / 14) and out["chair_i_unique"] == pytest.approx(4 / 12)
    assert out["chair_s"] == 0.75
    assert out["chair_i_ci"][0] <= 5 / 14 <= out["chair_i_ci"][1]


def test_gold_annotations_may_use_synonyms_and_plurals(coco):
    assert chair(["A puppy on a sofa."], [["dogs", "couch"]], coco)["hallucinated_mentions"] == 0


def test_evaluate_answers_under_the_coco_vocabulary(coco):
    prompts = [Prompt("d1", "Describe the image.", task="describe", objects=["dog", "frisbee"])]
    out = evaluate_answers(prompts, {"d1": "A puppy catches a frisbee near a bench."}, coco)
    assert (out["describe"]["mentions"], out["describe"]["hallucinated_mentions"]) == (3, 1)
    with pytest.raises(RecordError, match="d1.*'red square'.*'coco' vocabulary"):
        evaluate_answers([Prompt("d1", "Describe.", task="describe", objects=["red square"])], {"d1": ""}, coco)


def test_reference_judge_takes_a_vocabulary(coco):
    prompt = Prompt("p1", "Is there a cat in the image?", task="exists", reference_answer="no", objects=["dog"])
    text = "I see a puppy and a bench, no cat."
    sample = Sample("s1", "p1", text, text, "no", True, 9, "stop")
    score, note = hallucination(prompt, sample, coco)  # the cat is asked about, so it is not counted
    assert score == 0.5 and "bench" in note


def test_plural_rules():
    assert plurals("bus") == ["buses"] and plurals("pony") == ["ponies"] and plurals("toy") == ["toys"]
    assert plurals("knife") == ["knives", "knifes"] and plurals("giraffe") == ["giraffes"]
    assert plurals("policeman") == ["policemen"] and plurals("hot dog") == ["hot dogs"]
    assert plurals("buffalo") == ["buffalos", "buffaloes"] and plurals("person") == ["people"]


def test_shapes_stays_the_default_and_is_named_shapes():
    shapes = load_vocabulary("shapes")
    assert shapes.objects == ("square", "circle", "triangle")
    assert shapes.find("two violet boxes") == [Mention("square", "purple")]


# ---------------------------------------------------------------------------------------------
# user YAML vocabularies


def test_a_yaml_vocabulary(tmp_path):
    path = tmp_path / "kitchen.yaml"
    path.write_text(
        "objects:\n  cup: [mug, teacup]\n  cactus: []\n  dining table: [table]\n  chair:\n"
        "plurals:\n  cactus: [cacti]\n"
        "phrases:\n  coffee table: null\n  Tea Cup: cup\n"
        "attributes:\n  red: [crimson]\n"
    )
    vocab = load_vocabulary(str(path))
    assert vocab.objects == ("cup", "cactus", "dining table", "chair")
    text = "Two Mugs, three cacti, crimson teacups and a tea cup on a coffee table; chairs at the dining tables."
    assert [m.name for m in vocab.find(text)] == [
        "cup", "cactus", "red cup", "cup", "chair", "dining table",
    ]  # fmt: skip
    assert vocab.present(Mention("cup"), ["red cup"]) and not vocab.present(Mention("cup", "red"), ["cup"])


@pytest.mark.parametrize(("text", "expect"), [
    ("objects: [cup]\n", "objects: must be a non-empty mapping"),
    ("objects: {}\n", "objects: must be a non-empty mapping"),
    ("plurals: {cup: [cups]}\n", "objects: required key missing"),
    ("objects: {cup: mug}\ncolours: {}\n", "colours: unknown key"),
    ("objects: {cup: {mug: 1}}\n", "objects.cup: must be a list of words"),
    ("objects: {cup: [mug, 3]}\n", "objects.cup: must be a non-empty string, got 3"),
    ("objects: {cup: [mug], glass: [mug]}\n", "objects.glass: 'mug' is already a name or synonym of 'cup'"),
    ("objects: {cup: []}\nphrases: {tea cup: saucer}\n", "phrases.tea cup: 'saucer' is not an object name"),
    ("objects: {cup: [\n", "not valid YAML"),
    ("- cup\n", "expected a mapping with an `objects` key"),
])  # fmt: skip
def test_bad_yaml_vocabularies_name_the_file_and_key(tmp_path, text, expect):
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_vocabulary(str(path))
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value)


def test_a_missing_vocabulary_file_says_what_is_expected(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: vocabulary file not found.*shapes, coco"):
        load_vocabulary(str(tmp_path / "nope.yaml"))


def test_eval_reads_a_vocabulary_file_so_editing_it_reruns_eval(tmp_path):
    from test_fingerprints import _fingerprints, _inputs, _recipe_text

    from alignkit.recipe import load_recipe

    _inputs(tmp_path)
    vocab = tmp_path / "vocab.yaml"
    vocab.write_text("objects: {cup: [mug]}\n")
    (tmp_path / "r.yaml").write_text(_recipe_text(tmp_path, "dpo"))
    recipe = load_recipe(tmp_path / "r.yaml", [f"eval.vocabulary={vocab}"])
    assert load_recipe(tmp_path / "r.yaml").eval.vocabulary == "shapes"  # the default
    before = _fingerprints(recipe)
    vocab.write_text("objects: {cup: [mug, teacup]}\n")
    after = _fingerprints(recipe)
    assert [s for s in before if before[s] != after[s]] == ["eval"]
