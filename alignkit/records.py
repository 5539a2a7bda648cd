"""The records that flow between stages (Prompt, Sample, Verdict, Pair) and their files.

Every record carries stable ids (`prompt_id`, `sample_id`) so any stage can be re-run alone and
joined back. Files are jsonl; prompts may also come from parquet or a saved `datasets` directory.
Finished files are written under a temporary name and renamed, so a killed run never leaves a
file that looks finished; stages that produce output incrementally use `ResumableJsonl`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from PIL import Image

from alignkit.errors import RecordError


@dataclass
class Prompt:
    """An image+text prompt, optionally with the gold annotations a reference judge can use."""

    prompt_id: str
    question: str
    images: list[str] = field(default_factory=list)  # image file paths
    task: str = "open"  # describe | count | exists | color | open
    reference_answer: str | None = None
    objects: list[str] | None = None  # gold object list, e.g. ["red square", "blue circle"]
    level: int | None = None  # AlignGPT-style alignment level, 1..N (alignkit.data.levels), when scored
    clip_similarity: float | None = None  # the CLIP image–text cosine the level comes from


@dataclass
class Sample:
    """One sampled answer: the full text plus the parsed reasoning and final answer."""

    sample_id: str
    prompt_id: str
    text: str
    reasoning: str
    answer: str
    answer_parsed: bool  # False when the template's final-answer marker was not found
    num_tokens: int
    finish_reason: str  # "stop" or "length" (truncated)
    policy: str = ""  # the model (and adapter) that produced it


@dataclass
class Verdict:
    """A judge's verdict on one sample. A failed verdict keeps its reason and has no score."""

    sample_id: str
    prompt_id: str
    judge: str
    status: str  # "ok" | "failed"
    score: float | None
    scores: dict[str, float] = field(default_factory=dict)
    rationale: str = ""
    error: str | None = None


@dataclass
class Pair:
    """A preference pair in TRL's conversational format (`prompt`, `chosen`, `rejected`, `images`),
    plus what makes it useful outside alignkit: both sample ids, both scores, the margin and both
    judge rationales. `prompt` is the user turn exactly as the policy saw it (template applied)."""

    pair_id: str  # "<chosen sample_id>><rejected sample_id>"
    prompt_id: str
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    images: list[str]
    margin: float  # chosen_score - rejected_score
    chosen_score: float
    rejected_score: float
    chosen_rationale: str = ""
    rejected_rationale: str = ""
    chosen_id: str = ""
    rejected_id: str = ""
    level: int | None = None  # the prompt's alignment level, when the prompts stage scored levels


R = TypeVar("R", Prompt, Sample, Verdict, Pair)


def sample_id(prompt_id: str, index: int) -> str:
    """The stable id of the `index`-th sample of a prompt."""
    return f"{prompt_id}#s{index}"


# ---------------------------------------------------------------------------------------------
# jsonl


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) from a jsonl file; a bad line is an error naming file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _from_dict(cls: type[R], obj: dict[str, Any], where: str) -> R:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = required - obj.keys()
    if missing:
        raise RecordError(f"{where}: missing key(s) {sorted(missing)} for a {cls.__name__} record")
    return cls(**{k: v for k, v in obj.items() if k in names})


def read_records(path: str | Path, cls: type[R]) -> list[R]:
    """Read a jsonl file of `cls` records; errors name the file and line."""
    return [_from_dict(cls, obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Write a file or directory under a temporary sibling name, renamed onto `path` on success.

    The one way alignkit writes a finished output: a kill leaves either the old `path` or the new
    one, never a half-written file under the final name. On an error the temporary is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records as jsonl atomically."""
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(to_dict(r), ensure_ascii=False) + "\n")
    return Path(path)


class ResumableJsonl:
    """An output file written record by record, that survives a kill and resumes.

    Records go to `<name>.partial` (flushed and fsynced per `append`), next to a `<name>.key`
    holding the fingerprint of the inputs and settings. Opening it again with the same
    fingerprint keeps the complete lines already written (a torn last line is dropped);
    another fingerprint starts over. `finish()` renames the partial file to its final name.
    """

    def __init__(self, path: str | Path, fingerprint: str, id_key: str):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.keyfile = self.path.with_name(self.path.name + ".key")
        self.id_key = id_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        same = self.keyfile.exists() and self.keyfile.read_text().strip() == fingerprint
        if same and self.partial.exists():
            self.done = self._read_complete_lines()
        self.keyfile.write_text(fingerprint)
        # Rewrite only the complete lines, so appends never follow a torn line.
        with self.partial.open("w", encoding="utf-8") as f:
            for obj in self.done.values():
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f = self.partial.open("a", encoding="utf-8")

    def _read_complete_lines(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        for line in self.partial.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # torn write from a kill
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                break
            done[obj[self.id_key]] = obj
        return done

    def append(self, records: Iterable[Any]) -> None:
        for r in records:
            obj = to_dict(r)
            self.done[obj[self.id_key]] = obj
            self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self, order: Callable[[dict[str, Any]], Any] | None = None) -> Path:
        """Rename the partial file to its final name; with `order`, its records are first rewritten
        sorted by it (records that arrive in any order still make the same file)."""
        self._f.close()
        if order is not None:
            with atomic_output(self.partial) as tmp, tmp.open("w", encoding="utf-8") as f:
                for obj in sorted(self.done.values(), key=order):
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(self.partial, self.path)
        self.keyfile.unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------------------------------------
# prompts from user files


# Images are decoded only by these PIL plugins (no Ghostscript behind an EPS named .png), and only up
# to this many pixels (a decompression bomb is an error, not a hang or an out-of-memory kill).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_IMAGE_PIXELS = 64_000_000


def open_image(source: str | Path | io.BytesIO) -> Image.Image:
    """Open an image through the allow-list, refusing what is not a regular file and what is too large."""
    if not isinstance(source, io.BytesIO) and not Path(source).is_file():  # a FIFO or device would hang
        raise RecordError(f"{source}: not a regular image file")
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        name = "the embedded image" if isinstance(source, io.BytesIO) else str(source)
        raise RecordError(f"{name}: not an image in an accepted format ({', '.join(IMAGE_FORMATS)}): {e}") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise RecordError(f"{source}: image of {img.width}x{img.height} pixels, over the limit of {MAX_IMAGE_PIXELS}")
    return img


def _save_image_bytes(data: bytes, image_dir: Path) -> str:
    """Store image bytes under their content hash (as PNG) and return the path."""
    digest = hashlib.sha256(data).hexdigest()[:24]
    out = image_dir / f"{digest}.png"
    if not out.exists():
        img = open_image(io.BytesIO(data))
        with atomic_output(out) as tmp:
            img.save(tmp, format="PNG")
    return str(out)


def _image_ref(value: Any, base_dir: Path, image_dir: Path, where: str, outside: bool = False) -> str:
    """Normalise one image reference (path, bytes, base64, datasets dict, PIL) to a file path.

    A path must stay inside `base_dir` (the prompts file's directory) unless `outside` allows it:
    a dataset cannot make a run read `../../etc/...` or any absolute path by default."""
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return _save_image_bytes(buf.getvalue(), image_dir)
    if isinstance(value, (bytes, bytearray)):
        return _save_image_bytes(bytes(value), image_dir)
    if isinstance(value, dict):
        if value.get("bytes"):
            raw = value["bytes"]
            return _save_image_bytes(raw if isinstance(raw, bytes) else base64.b64decode(raw), image_dir)
        if value.get("path"):
            value = value["path"]
        else:
            raise RecordError(f"{where}: image entry has neither 'bytes' nor 'path'")
    if isinstance(value, str):
        if value.startswith("data:"):
            if not value.startswith("data:image/") or "," not in value:
                raise RecordError(f"{where}: a data URL that is not an image ({value[:40]!r}...)")
            return _save_image_bytes(base64.b64decode(value.split(",", 1)[1], validate=True), image_dir)
        p = (base_dir / value).resolve()
        if not outside and not p.is_relative_to(base_dir.resolve()):
            raise RecordError(f"{where}: image path {value!r} is outside {base_dir}; set "
                              "data.allow_outside_paths: true to allow it")  # fmt: skip
        return str(p)
    raise RecordError(f"{where}: unsupported image value of type {type(value).__name__}")


def image_files(images: Any, base_dir: Path, image_dir: Path, where: str, outside: bool) -> list[str]:
    """A record's images (one value or a list; see `_image_ref`) as file paths; errors name `where`."""
    if not images:  # None, "" or [] (a text-only record)
        return []
    try:
        return [_image_ref(v, base_dir, image_dir, where, outside) for v in (images if isinstance(images, list) else [images])]
    except binascii.Error as e:  # base64 that is not base64
        raise RecordError(f"{where}: cannot decode an embedded image ({e})") from None
    except RecordError as e:  # an embedded image that is not one: name the record
        if str(e).startswith(where):
            raise
        raise RecordError(f"{where}: {e}") from None


def _prompt_from_row(row: dict[str, Any], base_dir: Path, image_dir: Path, where: str, outside: bool) -> Prompt:
    row = dict(row)
    images = row.pop("image", None) if "images" not in row else row["images"]
    row["images"] = image_files(images, base_dir, image_dir, f"{where} (prompt_id={row.get('prompt_id', '?')})", outside)
    if "prompt_id" in row:
        row["prompt_id"] = str(row["prompt_id"])
    return _from_dict(Prompt, row, where)


HUB_PREFIX = "hf:"  # `hf:owner/name[:split]`: a Hub dataset, read from the local cache only


def iter_rows(source: str | Path, what: str) -> tuple[Path, Iterator[tuple[str, dict[str, Any]]]]:
    """The rows of a jsonl, JSON-array or parquet file, a saved `datasets` directory or a Hub
    dataset in the local cache (`hf:owner/name[:split]`), as (where, row) with `where` naming the
    file and line or row; and the directory relative image paths are taken from. `what` names the
    file in errors ("prompts", "pairs")."""
    if str(source).startswith(HUB_PREFIX):
        return Path.cwd(), _hub_rows(str(source))
    source = Path(source)
    if not source.exists():
        raise RecordError(f"{source}: {what} file or directory not found")
    if source.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(source))
        return source, ((f"{source} row {i}", r) for i, r in enumerate(ds))
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        return source.parent, ((f"{source} row {i}", r) for i, r in enumerate(pq.read_table(source).to_pylist()))
    if source.suffix == ".json":
        return source.parent, _json_array_rows(source)
    return source.parent, ((f"{source}:{n}", obj) for n, obj in iter_jsonl(source))


def _hub_rows(spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a Hub dataset already in the local `datasets` cache; nothing is downloaded."""
    import datasets

    name, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # read at call time: the cache or nothing
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        raise RecordError(f"{spec}: not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
                          f"load it once where there is network: datasets.load_dataset({name!r}) ({e})") from None  # fmt: skip
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return ((f"{spec} row {i}", r) for i, r in enumerate(ds))


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of a JSON file holding one array of them (LLaVA's and VLFeedback's layout)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise RecordError(f"{path} record {i}: expected a JSON object, got {type(obj).__name__}")
        yield f"{path} record {i}", obj


def load_image(path: str) -> Image.Image:
    """Open an image as RGB (through `open_image`'s allow-list and size limit)."""
    with open_image(path) as img:
        return img.convert("RGB")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (names and bytes), for stage fingerprints."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
