"""Chain-of-thought templates: how a question is asked, and how the answer is read back.

A template is an instruction appended to the question plus an output style:
`answer_line` (reasoning, then "Answer: ..." on the last line), `think_tags`
(`<think>...</think>` then the answer) or `plain` (the whole output is the answer).
Built-ins are named (`cot`, `think`, `plain`); a YAML file with `instruction` and `style`
may be named by path instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import TemplateError

STYLES = ("answer_line", "think_tags", "plain")


@dataclass(frozen=True)
class Template:
    name: str
    instruction: str
    style: str

    def render(self, question: str) -> str:
        """The user text: the question, then the instruction on its own line."""
        return f"{question}\n{self.instruction}" if self.instruction else question

    def messages(self, question: str, num_images: int) -> list[dict[str, Any]]:
        """One user turn in the content-list format VLM chat templates read (images first)."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.render(question)})
        return [{"role": "user", "content": content}]

    def parse(self, text: str) -> tuple[str, str, bool]:
        return parse_output(self.style, text)

    def format_output(self, reasoning: str, answer: str) -> str:
        """The output this template asks for (the inverse of `parse`): used to write SFT targets."""
        if self.style == "answer_line":
            return f"{reasoning}\nAnswer: {answer}" if reasoning else f"Answer: {answer}"
        if self.style == "think_tags":
            return f"<think>{reasoning}</think>\n{answer}"
        return answer


BUILTIN: dict[str, Template] = {
    "cot": Template(
        "cot",
        "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
        "answer_line",
    ),
    "think": Template(
        "think", "Think inside <think></think> tags, then give the final answer after them.", "think_tags"
    ),
    "plain": Template("plain", "", "plain"),
}


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a YAML template file by path."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise TemplateError(
            f"sample.template: unknown template {name_or_path!r}: not a built-in ({', '.join(BUILTIN)}) "
            f"nor a template file (a relative path is read from {Path.cwd()})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: cannot read the template file ({e})") from None
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: the template file is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("instruction", ""), str):
        raise TemplateError(f"{path}: a template file needs a mapping with a string 'instruction'")
    style = data.get("style", "answer_line")
    if style not in STYLES:
        raise TemplateError(f"{path}: style: {style!r} is not one of {STYLES}")
    return Template(path.stem, data.get("instruction", ""), style)


_ANSWER = re.compile(r"(?:final\s+)?answer\s*:", re.IGNORECASE)


def _last_line(text: str) -> tuple[str, str, bool]:
    """Fallback for output without the style's marker: the last non-empty line is the answer."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "", "", False
    return "\n".join(lines[:-1]).strip(), lines[-1].strip(), False


def parse_output(style: str, text: str) -> tuple[str, str, bool]:
    """Split model output into (reasoning, answer, parsed); parsed is False when no marker was found."""
    if style == "plain":
        answer = text.strip()
        return "", answer, bool(answer)
    if style == "answer_line":
        matches = list(_ANSWER.finditer(text))
        if not matches:
            return _last_line(text)
        m = matches[-1]
        answer = text[m.end() :].strip().splitlines()
        answer = answer[0].strip() if answer else ""
        return text[: m.start()].strip(), answer, bool(answer)
    if style == "think_tags":
        end = text.rfind("</think>")
        if end < 0:
            return _last_line(text)
        reasoning = text[:end]
        start = reasoning.find("<think>")
        reasoning = reasoning[start + len("<think>") :] if start >= 0 else reasoning
        answer = text[end + len("</think>") :].strip()
        return reasoning.strip(), answer, bool(answer)
    raise ValueError(f"unknown template style {style!r}; known: {STYLES}")
