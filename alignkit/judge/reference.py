"""The `reference` judge: scores a sample against its prompt's gold annotations, offline.

hallucination = share of the object mentions in the sample's FULL text (reasoning and answer)
that are not among the prompt's gold objects. The reasoning counts because a chain of thought
that invents a purple triangle is hallucinating even when its final answer is right, and the
pairs built from these verdicts train on the whole response. Objects the question itself names
are not counted ("No, there is no purple triangle" answers the question, it claims nothing).

correctness = for `describe` prompts, the share of gold objects the answer names (recall);
otherwise a normalised match of the final answer with the reference answer (case, punctuation,
digit words, yes/no synonyms; for count/exists/color the first number/yes-no/colour decides).

Objects are read with a vocabulary (`alignkit.objects`: the shapes world by default, COCO's
categories with CHAIR's synonyms, or a user's YAML file), passed as `vocab`.

The combined score uses the judge file's weights (judges/overall.yaml by default), so the
reference and LLM judges agree on how the two scores trade off.
"""

from __future__ import annotations

import re

from alignkit.errors import RecordError
from alignkit.judge.rubric import JudgeError, Rubric, load_rubric
from alignkit.objects import COLOR_WORDS, SHAPES_WORLD, Vocabulary
from alignkit.records import Prompt, Sample, Verdict

FIELDS = ("hallucination", "correctness")
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}  # fmt: skip
_YES_NO = {"yes": "yes", "yeah": "yes", "yep": "yes", "true": "yes", "no": "no", "nope": "no", "false": "no"}


class NoReference(Exception):
    """The prompt lacks the gold annotation a score needs."""


def check_rubric(rubric: Rubric) -> None:
    """The reference judge computes hallucination and correctness only."""
    if rubric.mode == "pairwise":
        raise JudgeError(f"{rubric.path}: mode: the reference judge scores samples one by one; use judge.backend=openai for a pairwise judge")
    for s in rubric.scores:
        if s.name not in FIELDS:
            raise JudgeError(
                f"{rubric.path}: scores.{s.name}: the reference judge computes only {list(FIELDS)}; "
                "use judge.backend=openai for other scores"
            )


def judge_reference(rubric: Rubric, prompt: Prompt, sample: Sample, vocab: Vocabulary = SHAPES_WORLD) -> Verdict:
    """One verdict; scores in [0, 1] (hallucination: higher is worse), combined with the rubric's weights.

    Objects are read with `vocab` (the shapes world by default; `alignkit.objects.load_vocabulary`).
    """
    judge = f"reference/{rubric.name}"
    scores: dict[str, float] = {}
    notes: list[str] = []
    try:
        for s in rubric.scores:
            value, note = (hallucination if s.name == "hallucination" else correctness)(prompt, sample, vocab)
            scores[s.name] = value
            notes.append(note)
    except NoReference as e:
        return Verdict(sample.sample_id, prompt.prompt_id, judge, "failed", None, error=f"no_reference: {e}")
    except RecordError as e:  # a gold annotation it cannot read
        raise RecordError(f"prompt {prompt.prompt_id}: {e}") from None
    return Verdict(
        sample.sample_id, prompt.prompt_id, judge, "ok", rubric.combine(scores), scores, " ".join(notes)
    )


def reference_verdicts(
    rubric: Rubric, items: list[tuple[Prompt, Sample]], vocab: Vocabulary = SHAPES_WORLD
) -> list[Verdict]:
    """Reference verdicts to compare an LLM judge with, under its weights when the reference can
    compute its scores, else under `overall`'s; prompts without gold annotations (or with gold
    objects outside `vocab`) yield none."""
    try:
        check_rubric(rubric)
    except JudgeError:
        rubric = load_rubric("overall")
    verdicts = (_comparable(rubric, p, s, vocab) for p, s in items if p.objects is not None or p.reference_answer)
    return [v for v in verdicts if v is not None and v.status == "ok"]


def _comparable(rubric: Rubric, prompt: Prompt, sample: Sample, vocab: Vocabulary) -> Verdict | None:
    """A reference verdict for the LLM judge's report, or None when the vocabulary cannot read the
    prompt's gold objects (e.g. MMHal-Bench's OpenImages labels): a comparison, never a failure."""
    try:
        return judge_reference(rubric, prompt, sample, vocab)
    except RecordError:
        return None


def hallucination(prompt: Prompt, sample: Sample, vocab: Vocabulary = SHAPES_WORLD) -> tuple[float, str]:
    """(share of unsupported object mentions, explanation)."""
    if prompt.objects is None:
        raise NoReference(f"prompt {prompt.prompt_id} has no gold objects, needed for hallucination")
    asked = vocab.find(prompt.question)
    asked_names = {m.name for m in asked}
    asked_objects = {m.object for m in asked}
    counted = [
        m
        for m in vocab.find(sample.text)
        if m.name not in asked_names and not (m.attribute is None and m.object in asked_objects)
    ]
    if not counted:
        return 0.0, "Hallucination: no object mentions to check."
    unsupported = [m for m in counted if not vocab.present(m, prompt.objects)]
    if not unsupported:
        return 0.0, f"Hallucination: all {len(counted)} object mentions are in the image."
    names = list(dict.fromkeys(m.name for m in unsupported))
    what = ", ".join(names)
    verb = "is" if len(names) == 1 else "are"
    return (
        len(unsupported) / len(counted),
        f"Hallucination: {len(unsupported)} of {len(counted)} object mentions unsupported; "
        f"mentions {what}, which {verb} not in the image.",
    )


def correctness(prompt: Prompt, sample: Sample, vocab: Vocabulary = SHAPES_WORLD) -> tuple[float, str]:
    """(correctness in [0, 1], explanation); a gold object counts as named when the answer names it
    in full (a bare "square" does not name a "red square")."""
    if prompt.task == "describe" and prompt.objects is not None:
        gold = list(dict.fromkeys(vocab.parse(g).name for g in prompt.objects))
        if not gold:
            return 1.0, "Correctness: the image has no objects to name."
        named = {m.name for m in vocab.find(sample.answer)}
        missed = [g for g in gold if g not in named]
        note = f"Correctness: names {len(gold) - len(missed)} of {len(gold)} objects"
        return 1.0 - len(missed) / len(gold), note + (f"; misses {', '.join(missed)}." if missed else ".")
    if prompt.reference_answer is None:
        raise NoReference(
            f"prompt {prompt.prompt_id} (task {prompt.task!r}) has no reference_answer"
            + (" and no objects" if prompt.task == "describe" else "")
            + ", needed for correctness"
        )
    ok = answers_match(sample.answer, prompt.reference_answer, prompt.task)
    verdict = "matches" if ok else "does not match"
    note = f"Correctness: final answer {sample.answer.strip()!r} {verdict} the reference {prompt.reference_answer!r}."
    return float(ok), note


def normalise(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped, number words as digits, yes/no synonyms folded."""
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())
    return [_YES_NO.get(w, _NUMBER_WORDS.get(w, w)) for w in words]


def answers_match(answer: str, reference: str, task: str) -> bool:
    """Whether a final answer agrees with the reference answer (see the module docstring)."""
    got, want = normalise(answer), normalise(reference)
    key = _KEYS.get(task)
    if key is not None and key(want) is not None:
        return key(got) == key(want)
    if not want:
        return not got
    n = len(want)
    return any(got[i : i + n] == want for i in range(len(got) - n + 1))


def _first(tokens: list[str], pred) -> str | None:
    return next((t for t in tokens if pred(t)), None)


_KEYS = {
    "count": lambda toks: _first(toks, lambda t: t.replace(".", "", 1).isdigit()),
    "exists": lambda toks: _first(toks, lambda t: t in ("yes", "no")),
    "color": lambda toks: (c := _first(toks, lambda t: t in COLOR_WORDS)) and COLOR_WORDS[c],
}
