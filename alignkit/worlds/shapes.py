"""The synthetic "shapes" world: images of coloured shapes with exact gold annotations.

Every image is a white square split into a 2x2 grid; 1-4 shapes sit in distinct cells, each a
distinct "colour shape" pair (so a description never repeats an object). Prompt `i` of a seed is
the same whatever `num_prompts` is, which lets tests and recipes grow a data set without
changing the prompts they already have. Counts are answered with digits ("2").
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from alignkit.objects import COLORS, SHAPES
from alignkit.records import Prompt, write_jsonl

TASKS: tuple[str, ...] = ("describe", "count", "exists", "color")

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}

QUESTIONS: dict[str, str] = {
    "describe": "Describe the image.",
    "count": "How many shapes are in the image?",
    "exists": "Is there a {object} in the image?",
    "color": "What color is the {shape}?",
}


def describe_objects(objects: list[str]) -> str:
    """The canonical description: "There is a red square, a green circle and a blue circle."."""
    if not objects:
        return "There is nothing in the image."
    items = [f"a {o}" for o in objects]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"There is {listed}."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _scene(rng: random.Random) -> list[tuple[int, str, str]]:
    """1-4 (cell, colour, shape) triples in distinct cells, listed in reading order."""
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    return [(cell, c, s) for cell, (c, s) in zip(cells, pairs)]


def _render(scene: list[tuple[int, str, str]], size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for idx, color, shape in scene:
        side = int(cell * rng.uniform(0.55, 0.8))
        slack = cell - side
        x = (idx % 2) * cell + rng.randint(0, slack)
        y = (idx // 2) * cell + rng.randint(0, slack)
        _draw_shape(draw, shape, (x, y, x + side - 1, y + side - 1), RGB[color])
    return img


def _question(task: str, objects: list[str], rng: random.Random) -> tuple[str, str] | None:
    """(question, reference answer) for a task, or None if the scene cannot pose it."""
    if task == "describe":
        return QUESTIONS["describe"], describe_objects(objects)
    if task == "count":
        return QUESTIONS["count"], str(len(objects))
    if task == "exists":
        if rng.random() < 0.5:
            return QUESTIONS["exists"].format(object=rng.choice(objects)), "yes"
        absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in objects]
        return QUESTIONS["exists"].format(object=rng.choice(absent)), "no"
    if task == "color":
        shapes = [o.split()[1] for o in objects]
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return QUESTIONS["color"].format(shape=shape), objects[shapes.index(shape)].split()[0]
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def make_shapes_prompts(
    out_dir: Path,
    num_prompts: int,
    seed: int = 0,
    image_size: int = 112,
    tasks: tuple[str, ...] = TASKS,
) -> list[Prompt]:
    """Write `num_prompts` images under `out_dir/images/` and return their prompts.

    Tasks cycle in the given order, so every task gets an equal share.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {TASKS}")
    image_dir = Path(out_dir).resolve() / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    prompts = []
    for i in range(num_prompts):
        rng = random.Random(f"shapes-{seed}-{i}")
        task = tasks[i % len(tasks)]
        while True:  # redraw the scene until it can pose the task (only "color" ever needs it)
            scene = _scene(rng)
            objects = [f"{c} {s}" for _, c, s in scene]
            qa = _question(task, objects, rng)
            if qa is not None:
                break
        pid = f"shapes-{seed}-{i:05d}"
        path = image_dir / f"{pid}.png"
        _render(scene, image_size, rng).save(path)
        prompts.append(Prompt(pid, qa[0], [str(path)], task, qa[1], objects))
    return prompts


def write_prompts(prompts: list[Prompt], path: Path) -> Path:
    """Write prompts as jsonl (atomically)."""
    return write_jsonl(path, prompts)


def corpus(num: int = 400, seed: int = 0) -> list[str]:
    """Every kind of text the shapes world produces, for training a tiny tokenizer."""
    rng = random.Random(seed)
    lines = [describe_objects([f"{c} {s}" for c, s in zip(COLORS, SHAPES)])]
    lines += [f"{c} {s} {s}s" for c in COLORS for s in SHAPES]
    for _ in range(num):
        objects = [f"{c} {s}" for _, c, s in _scene(rng)]
        for task in TASKS:
            qa = _question(task, objects, rng)
            if qa:
                lines += list(qa)
    return lines


def perceived_answer(
    prompt: Prompt, rng: random.Random, error_rate: float, yes_bias: float = 1.0, exists_answer_first: bool = False
) -> tuple[str, str, bool]:
    """(reasoning, answer, hallucinated) as a policy that sometimes sees an extra object would say.

    With probability `error_rate` the "perceived" scene gains one object that is not in the image
    (for an existence question about an absent object, with probability `yes_bias` that very
    object: the yes-bias POPE measures). Reasoning lists the perceived scene and the answer follows
    from it, so the error is a plausible hallucination rather than noise: descriptions name the
    extra object, counts are one too high, existence answers say "yes". With `yes_bias` 0 an
    existence answer still follows the listed scene, but "yes" and "no" are equally common, so
    "always yes" no longer fits the data and the answer has to look the asked object up.
    `exists_answer_first` opens an existence reasoning with the asked object and its answer ("A red
    circle: no. I see 2 shapes: ..."): the lookup is then made next to the question, where the asked
    object sits at a fixed distance, instead of after a list of varying length.
    """
    objects = list(prompt.objects or [])
    asked = prompt.question.removeprefix("Is there a ").removesuffix(" in the image?")  # (existence questions)
    hallucinated = rng.random() < error_rate
    if hallucinated:
        absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in objects]
        extra = rng.choice(absent)
        # (yes_bias 1 draws nothing more, so the default keeps the data of earlier versions)
        if prompt.task == "exists" and prompt.reference_answer == "no" and (yes_bias >= 1 or rng.random() < yes_bias):
            extra = asked
        objects.insert(rng.randint(0, len(objects)), extra)
    reasoning = f"I see {len(objects)} shape{'s' if len(objects) != 1 else ''}: " + describe_objects(objects)[9:]
    if prompt.task == "describe":
        answer = describe_objects(objects)
    elif prompt.task == "count":
        answer = str(len(objects))
    elif prompt.task == "exists":
        answer = "yes" if asked in objects else "no"
        if exists_answer_first:
            reasoning = f"A {asked}: {answer}. {reasoning}"
    else:
        answer = prompt.reference_answer or ""
    return reasoning, answer, hallucinated


def sft_examples(
    prompts: list[Prompt],
    template,
    error_rate: float,
    seed: int = 0,
    yes_bias: float = 1.0,
    exists_answer_first: bool = False,
) -> list[dict]:
    """SFT examples (TRL prompt-completion format) whose answers hallucinate at `error_rate`
    (`yes_bias`, `exists_answer_first`: see `perceived_answer`).

    `template` is a `sample.templates.Template`: the prompt is asked and the answer written the
    way the policy will later be sampled, so SFT teaches the chain-of-thought format too.
    """
    rng = random.Random(f"sft-{seed}")
    rows = []
    for p in prompts:
        reasoning, answer, hallucinated = perceived_answer(p, rng, error_rate, yes_bias, exists_answer_first)
        rows.append({
            "prompt": template.messages(p.question, len(p.images)),
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": template.format_output(reasoning, answer)}]}],
            "images": list(p.images),
            "hallucinated": hallucinated,
        })  # fmt: skip
    return rows
