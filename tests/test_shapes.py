from pathlib import Path

import pytest
from PIL import Image

from alignkit.objects import COLORS, SHAPES, find_mentions
from alignkit.worlds.shapes import RGB, describe_objects, make_shapes_prompts


def _strip_paths(prompts):
    return [(p.prompt_id, p.question, p.task, p.reference_answer, p.objects) for p in prompts]


def test_same_seed_same_world_and_prefix_stable(tmp_path: Path):
    a = make_shapes_prompts(tmp_path / "a", 12, seed=3)
    b = make_shapes_prompts(tmp_path / "b", 5, seed=3)
    assert _strip_paths(a[:5]) == _strip_paths(b)
    for pa, pb in zip(a[:5], b):
        assert Path(pa.images[0]).read_bytes() == Path(pb.images[0]).read_bytes()
    c = make_shapes_prompts(tmp_path / "c", 12, seed=4)
    assert _strip_paths(c) != _strip_paths(a)
    assert a[0].prompt_id == "shapes-3-00000"


def test_gold_annotations_match_the_question(tmp_path: Path):
    prompts = make_shapes_prompts(tmp_path, 80, seed=1)
    assert {p.task for p in prompts} == {"describe", "count", "exists", "color"}
    for p in prompts:
        assert 1 <= len(p.objects) <= 4 and len(set(p.objects)) == len(p.objects)
        assert all(o.split()[0] in COLORS and o.split()[1] in SHAPES for o in p.objects)
        if p.task == "describe":
            assert p.reference_answer == describe_objects(p.objects)
            assert [m.name for m in find_mentions(p.reference_answer)] == p.objects
        elif p.task == "count":
            assert p.reference_answer == str(len(p.objects))
        elif p.task == "exists":
            asked = find_mentions(p.question)[0].name
            assert p.reference_answer == ("yes" if asked in p.objects else "no")
        elif p.task == "color":
            shape = find_mentions(p.question)[0].object
            matching = [o for o in p.objects if o.endswith(" " + shape)]
            assert len(matching) == 1 and p.reference_answer == matching[0].split()[0]


def test_images_show_the_gold_objects(tmp_path: Path):
    for p in make_shapes_prompts(tmp_path, 24, seed=2):
        img = Image.open(p.images[0])
        assert img.size == (112, 112) and img.mode == "RGB"
        colours = {c for count, c in img.getcolors(112 * 112) if count > 50}
        assert colours == {RGB[o.split()[0]] for o in p.objects} | {(255, 255, 255)}
        occupied = 0
        for cx in (0, 56):
            for cy in (0, 56):
                cell = img.crop((cx, cy, cx + 56, cy + 56))
                occupied += cell.getcolors(56 * 56) != [(56 * 56, (255, 255, 255))]
        assert occupied == len(p.objects)


def test_exists_questions_are_balanced(tmp_path: Path):
    prompts = make_shapes_prompts(tmp_path, 200, tasks=("exists",))
    yes = sum(p.reference_answer == "yes" for p in prompts)
    assert 70 <= yes <= 130


def test_describe_objects():
    assert describe_objects(["red square"]) == "There is a red square."
    assert describe_objects(["red square", "blue circle"]) == "There is a red square and a blue circle."
    assert describe_objects(["red square", "blue circle", "green triangle"]) == (
        "There is a red square, a blue circle and a green triangle."
    )


def test_unknown_task_is_an_error(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown task"):
        make_shapes_prompts(tmp_path, 2, tasks=("paint",))
