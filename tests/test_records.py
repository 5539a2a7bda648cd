"""Records I/O: prompts from jsonl/parquet/datasets, images as paths or bytes; resumable files."""

import base64
import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignkit.data.formats import read_prompts
from alignkit.records import (
    Prompt,
    RecordError,
    ResumableJsonl,
    load_image,
    read_records,
    sample_id,
    write_jsonl,
)


def png_bytes(color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_jsonl_prompts_with_relative_paths_and_data_urls(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt_id": 1, "question": "q1", "image": "a.png"}) + "\n"
                   + json.dumps({"prompt_id": "b", "question": "q2", "images": [data_url]}) + "\n")
    prompts = read_prompts(src, tmp_path / "imgs")
    assert [p.prompt_id for p in prompts] == ["1", "b"]
    assert prompts[0].images == [str((tmp_path / "a.png").resolve())]
    assert Image.open(prompts[1].images[0]).getpixel((0, 0)) == (0, 0, 255)


def test_parquet_and_datasets_dir_with_image_bytes(tmp_path):
    rows = [{"prompt_id": "x", "question": "q", "images": [{"bytes": png_bytes(), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    p1 = read_prompts(tmp_path / "p.parquet", tmp_path / "imgs")
    ds = datasets.Dataset.from_list([{"prompt_id": "x", "question": "q", "image": Image.new("RGB", (8, 8), "red")}])
    ds.save_to_disk(str(tmp_path / "ds"))
    p2 = read_prompts(tmp_path / "ds", tmp_path / "imgs")
    assert Image.open(p1[0].images[0]).getpixel((0, 0)) == Image.open(p2[0].images[0]).getpixel((0, 0)) == (255, 0, 0)


def test_bad_line_names_file_and_line(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt_id": "a", "question": "q"}\n{not json\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:2: not valid JSON"):
        read_prompts(src, tmp_path)


def test_missing_key_and_duplicate_ids_are_errors(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt_id": "a"}\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:1: missing key\(s\) \['question'\]"):
        read_prompts(src, tmp_path)
    src.write_text('{"prompt_id": "a", "question": "q"}\n{"prompt_id": "a", "question": "q"}\n')
    with pytest.raises(RecordError, match="duplicate prompt_id 'a'"):
        read_prompts(src, tmp_path)


def test_write_and_read_round_trip(tmp_path):
    prompts = [Prompt("a", "q", ["/x.png"], "count", "2", ["red square", "blue circle"])]
    write_jsonl(tmp_path / "p.jsonl", prompts)
    assert read_records(tmp_path / "p.jsonl", Prompt) == prompts
    assert not (tmp_path / "p.jsonl.tmp").exists()


def test_resumable_keeps_complete_lines_drops_torn_line(tmp_path):
    out = tmp_path / "s.jsonl"
    w = ResumableJsonl(out, "fp1", id_key="sample_id")
    w.append([{"sample_id": sample_id("a", 0)}, {"sample_id": sample_id("a", 1)}])
    w.close()
    with (tmp_path / "s.jsonl.partial").open("a") as f:
        f.write('{"sample_id": "a#s2", "te')  # a kill in the middle of a write
    w = ResumableJsonl(out, "fp1", id_key="sample_id")
    assert sorted(w.done) == ["a#s0", "a#s1"]
    w.append([{"sample_id": "a#s2"}])
    w.finish()
    assert [json.loads(l)["sample_id"] for l in out.read_text().splitlines()] == ["a#s0", "a#s1", "a#s2"]


def test_resumable_starts_over_when_fingerprint_changes(tmp_path):
    out = tmp_path / "s.jsonl"
    w = ResumableJsonl(out, "fp1", id_key="sample_id")
    w.append([{"sample_id": "a#s0"}])
    w.close()
    assert ResumableJsonl(out, "fp2", id_key="sample_id").done == {}


# ---------------------------------------------------------------------------------------------
# hostile inputs: a clear error naming the file and line or the prompt, never a traceback or a hang


def _prompts_file(tmp_path, *rows):
    path = tmp_path / "data" / "prompts.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def test_a_non_utf8_line_names_the_file_and_line(tmp_path):
    path = _prompts_file(tmp_path, {"prompt_id": "a", "question": "q"}, b'{"prompt_id": "b", "question": "\xff"}\n')
    with pytest.raises(RecordError, match=r"prompts.jsonl:2: not UTF-8 text"):
        read_prompts(path, tmp_path / "img")


def test_bad_embedded_images_name_the_record(tmp_path):
    bad_b64 = {"prompt_id": "a", "question": "q", "images": ["data:image/png;base64,@@not-base64@@"]}
    with pytest.raises(RecordError, match=r"prompts.jsonl:1 \(prompt_id=a\): cannot decode an embedded image"):
        read_prompts(_prompts_file(tmp_path, bad_b64), tmp_path / "img")
    text = {"prompt_id": "b", "question": "q", "images": ["data:text/plain;base64,aGVsbG8="]}
    with pytest.raises(RecordError, match=r"prompts.jsonl:1 \(prompt_id=b\): a data URL that is not an image"):
        read_prompts(_prompts_file(tmp_path, text), tmp_path / "img")
    not_png = {"prompt_id": "c", "question": "q", "images": ["data:image/png;base64," + base64.b64encode(b"%!PS").decode()]}
    with pytest.raises(RecordError, match=r"prompt_id=c\): the embedded image: not an image in an accepted format"):
        read_prompts(_prompts_file(tmp_path, not_png), tmp_path / "img")


def test_image_paths_outside_the_prompts_directory_are_refused_unless_allowed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    for ref in ("../outside.png", str(tmp_path / "outside.png")):
        path = _prompts_file(tmp_path, {"prompt_id": "a", "question": "q", "images": [ref]})
        with pytest.raises(RecordError, match=r"image path .* is outside .*data.allow_outside_paths: true"):
            read_prompts(path, tmp_path / "img")
        (p,) = read_prompts(path, tmp_path / "img", allow_outside_paths=True)
        assert p.images == [str((tmp_path / "outside.png").resolve())]


def test_images_are_decoded_through_an_allow_list_with_a_size_limit(tmp_path):
    import os

    (tmp_path / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(RecordError, match=r"eps.png: not an image in an accepted format"):
        load_image(str(tmp_path / "eps.png"))  # PIL's EPS plugin (Ghostscript) is never reached
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 megapixels in a small file
    with pytest.raises(RecordError, match=r"bomb.png: image of 10000x10000 pixels, over the limit"):
        load_image(str(tmp_path / "bomb.png"))
    os.mkfifo(tmp_path / "fifo.png")  # opening it would block forever
    with pytest.raises(RecordError, match=r"fifo.png: not a regular image file"):
        load_image(str(tmp_path / "fifo.png"))


def test_an_empty_prompts_file_is_an_error(tmp_path):
    with pytest.raises(RecordError, match=r"prompts.jsonl: no prompts in it"):
        read_prompts(_prompts_file(tmp_path), tmp_path / "img")
