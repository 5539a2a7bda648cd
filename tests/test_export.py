"""`alignkit export pairs`: LLaMA-Factory and ms-swift datasets from a hand-written pairs file, checked
field by field and re-read as each tool's documented format says it reads them (neither tool is
installed here, so this checks the documented format, not the tools themselves)."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import RecordError
from alignkit.export import export_pairs


def _image(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _pair(pid: str, question: str, chosen: str, rejected: str, images: list[str]) -> dict:
    """A pair as alignkit's pairs stage writes it (TRL's conversational format plus scores and ids)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {
        "pair_id": f"{pid}#s0>{pid}#s1", "prompt_id": pid,
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": images, "margin": 0.5, "chosen_score": 0.75, "rejected_score": 0.25,
        "chosen_rationale": "fine", "rejected_rationale": "a made-up cat", "chosen_id": f"{pid}#s0", "rejected_id": f"{pid}#s1",
    }  # fmt: skip


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with pairs.jsonl: two pairs on one image (absolute path), one on two images (one
    of them relative to the pairs file), one with no image."""
    run = tmp_path / "run"
    red = _image(tmp_path / "imgs" / "red.png", "red")
    _image(run / "images" / "blue.png", "blue")
    pairs = [
        _pair("p1", "What is in the image?", "A red square.", "A red cat.", [str(red)]),
        _pair("p1b", "Describe it.", "Red.", "Green.", [str(red)]),
        _pair("p2", "Compare the images.", "Red then blue.", "Two cats.", [str(red), "images/blue.png"]),
        _pair("p3", "Say hi.", "Hi.", "Bye.", []),
    ]
    (run / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return run


def _llamafactory_read(dataset_dir: Path, name: str) -> list[dict]:
    """Read a dataset as LLaMA-Factory's data/README.md describes: the `dataset_info.json` entry gives the
    file and the column and tag names; in sharegpt format human turns sit at odd positions, a preference
    set ends its messages on a human turn with `chosen`/`rejected` from the assistant, and the images
    (relative to the dataset directory) match the `<image>` tags."""
    entry = json.loads((dataset_dir / "dataset_info.json").read_text())[name]
    assert entry["formatting"] == "sharegpt" and entry["ranking"] is True
    cols, tags = entry["columns"], entry["tags"]
    rows = json.loads((dataset_dir / entry["file_name"]).read_text())
    out = []
    for row in rows:
        messages = row[cols["messages"]]
        roles = [m[tags["role_tag"]] for m in messages]
        assert roles[::2] == [tags["user_tag"]] * len(roles[::2]) and len(roles) % 2 == 1
        chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
        assert chosen[tags["role_tag"]] == rejected[tags["role_tag"]] == tags["assistant_tag"]
        images = [dataset_dir / p for p in row[cols["images"]]]
        assert all(not Path(p).is_absolute() for p in row[cols["images"]]) and all(p.is_file() for p in images)
        text = "".join(m[tags["content_tag"]] for m in messages)
        assert text.count("<image>") == len(images)
        out.append({"question": text, "chosen": chosen[tags["content_tag"]],
                    "rejected": rejected[tags["content_tag"]], "images": images})  # fmt: skip
    return out


def test_llamafactory_export_field_by_field(run_dir, tmp_path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    done = export_pairs(run_dir, "llamafactory", out, name="rlaif")
    assert done == {"pairs": 4, "images": 2, "file": str(out / "rlaif.json")}
    rows = json.loads((out / "rlaif.json").read_text())
    red = rows[0]["images"][0]
    assert red.startswith("images/") and red.endswith(".png")
    assert rows[0] == {
        "conversations": [{"from": "human", "value": "<image>What is in the image?"}],
        "chosen": {"from": "gpt", "value": "A red square."},
        "rejected": {"from": "gpt", "value": "A red cat."},
        "images": [red],
    }
    assert rows[1]["images"] == [red]  # one copy of a shared image
    assert rows[2]["conversations"][0]["value"] == "<image><image>Compare the images."
    assert rows[2]["images"][0] == red and rows[2]["images"][1] != red
    assert rows[3]["images"] == [] and rows[3]["conversations"][0]["value"] == "Say hi."
    assert (out / red).read_bytes() == (tmp_path / "imgs" / "red.png").read_bytes()
    assert (out / rows[2]["images"][1]).read_bytes() == (run_dir / "images" / "blue.png").read_bytes()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        {Path(red).name, Path(rows[2]["images"][1]).name}
    )
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}  # the user's other datasets are kept
    read = _llamafactory_read(out, "rlaif")
    assert [(r["chosen"], r["rejected"]) for r in read] == [
        ("A red square.", "A red cat."), ("Red.", "Green."), ("Red then blue.", "Two cats."), ("Hi.", "Bye.")
    ]  # fmt: skip
    assert [len(r["images"]) for r in read] == [1, 1, 2, 0]


def test_swift_export_field_by_field(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    done = export_pairs(run_dir / "pairs.jsonl", "swift", out)
    assert done["pairs"] == 4 and done["file"] == str(out / "alignkit_pairs.jsonl")
    rows = [json.loads(line) for line in (out / "alignkit_pairs.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "messages": [{"role": "user", "content": "<image>What is in the image?"},
                     {"role": "assistant", "content": "A red square."}],
        "rejected_response": "A red cat.",
        "images": rows[0]["images"],
    }  # fmt: skip
    # ms-swift's standard keys: `messages` (required), `rejected_response` for DPO, `images`; it resolves
    # relative image paths against the working directory, so the README says to run it from OUT
    monkeypatch.chdir(out)
    for row, want in zip(rows, [1, 1, 2, 0]):
        assert set(row) == {"messages", "rejected_response", "images"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"].count("<image>") == len(row["images"]) == want
        assert all(Path(p).is_file() and not os.path.isabs(p) for p in row["images"])
    assert [(r["messages"][-1]["content"], r["rejected_response"]) for r in rows][2] == ("Red then blue.", "Two cats.")


def test_rerun_copies_only_missing_images(run_dir, tmp_path):
    out = tmp_path / "lf"
    export_pairs(run_dir, "llamafactory", out)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    victim = sorted(first)[0]
    (out / "images" / victim).unlink()
    export_pairs(run_dir, "llamafactory", out)
    again = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert set(again) == set(first)
    assert all(again[n] == first[n] for n in first if n != victim)


def test_cli_export(run_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", "pairs", str(run_dir), "--to", "swift", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "wrote 4 pairs" in result.output and (tmp_path / "o" / "alignkit_pairs.jsonl").is_file()


def _bad(run_dir: Path, line: int, **change) -> None:
    lines = (run_dir / "pairs.jsonl").read_text().splitlines()
    pair = json.loads(lines[line - 1])
    for key, value in change.items():
        if value is None:
            pair.pop(key)
        else:
            pair[key] = value
    lines[line - 1] = json.dumps(pair)
    (run_dir / "pairs.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chosen": None}, r"pairs.jsonl:2: missing key\(s\) \['chosen'\]"),
        (
            {"images": []},
            r"pairs.jsonl:2 \(pair_id=p1b#s0>p1b#s1\): the prompt has 1 image item\(s\) but 'images' lists 0",
        ),
        ({"images": ["nowhere.png"]}, r"pairs.jsonl:2 \(pair_id=p1b#s0>p1b#s1\): image 'nowhere.png' not found"),
        (
            {"rejected": "Green."},
            r"pairs.jsonl:2 \(pair_id=p1b#s0>p1b#s1\) rejected: expected a non-empty list of turns",
        ),
        ({"prompt": [{"role": "user", "content": [{"type": "video"}]}]}, r"pairs.jsonl:2 .*prompt: content items are"),
    ],
)
def test_bad_pairs_file_is_a_clear_error(run_dir, tmp_path, change, message):
    _bad(run_dir, 2, **change)
    with pytest.raises(RecordError, match=message):
        export_pairs(run_dir, "llamafactory", tmp_path / "o")
    result = CliRunner().invoke(
        app, ["export", "pairs", str(run_dir), "--to", "llamafactory", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_bad_sources_and_targets(tmp_path, run_dir):
    with pytest.raises(RecordError, match="holds no pairs.jsonl"):
        export_pairs(tmp_path / "imgs", "swift", tmp_path / "o")
    with pytest.raises(RecordError, match="no such file"):
        export_pairs(tmp_path / "missing.jsonl", "swift", tmp_path / "o")
    with pytest.raises(RecordError, match="unknown export target 'axolotl'"):
        export_pairs(run_dir, "axolotl", tmp_path / "o")
    with pytest.raises(RecordError, match="dataset name '../x'"):
        export_pairs(run_dir, "swift", tmp_path / "o", name="../x")
    (run_dir / "pairs.jsonl").write_text("not json\n")
    with pytest.raises(RecordError, match=r"pairs.jsonl:1: not valid JSON"):
        export_pairs(run_dir, "swift", tmp_path / "o")
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text("{broken")
    (run_dir / "pairs.jsonl").write_text(json.dumps(_pair("p", "q", "a", "b", [])) + "\n")
    with pytest.raises(RecordError, match="existing dataset_info.json that is not valid JSON"):
        export_pairs(run_dir, "llamafactory", out)


def test_pairs_as_the_pairs_stage_writes_them_export(tmp_path):
    """The pairs stage's own records (make_pair) export, so the hand-written format above stays honest."""
    from alignkit.pairs import make_pair
    from alignkit.records import Prompt, Sample, Verdict, write_jsonl

    img = _image(tmp_path / "a.png", "green")
    prompt = Prompt("p", "Describe.", images=[str(img)])
    judged = [(Sample(f"p#s{i}", "p", t, "", t, True, 2, "stop"), Verdict(f"p#s{i}", "p", "ref", "ok", s))
              for i, (t, s) in enumerate([("A green square.", 1.0), ("A cat.", 0.0)])]  # fmt: skip
    write_jsonl(tmp_path / "pairs.jsonl", [make_pair(prompt, "Describe. Think.", judged[0], judged[1])])
    export_pairs(tmp_path / "pairs.jsonl", "swift", tmp_path / "o")
    row = json.loads((tmp_path / "o" / "alignkit_pairs.jsonl").read_text())
    assert row["messages"] == [{"role": "user", "content": "<image>Describe. Think."},
                               {"role": "assistant", "content": "A green square."}]  # fmt: skip
    assert row["rejected_response"] == "A cat." and len(row["images"]) == 1
