"""The run report (alignkit.report): its figures against hand counts, a page that needs no network,
and the page itself in headless Chromium (Debian's package, driven by Playwright): no console
errors, plots drawn, the pair viewer's filters and search showing what a hand count says.

`fake_run` writes a two-round run directory record by record (every section, 3000 pairs: the
viewer's size target); the slow test also reports a real small run made by `alignkit run`.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from alignkit.errors import RecordError
from alignkit.report import histogram, render, report_data, write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "zebra"  # in the rationales of every 7th pair of round 2 only


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _conv(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": [{"type": "text", "text": text}]}]


def fake_run(root: Path, pairs_per_round: int = 1500, num_images: int = 40) -> dict:
    """A two-round run directory with every file the report reads; returns what was written."""
    images = []
    for i in range(num_images):
        path = root / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (400, 300), ((i * 37) % 255, 90, 160)).save(path)
        images.append(str(path))
    prompts = [{"prompt_id": f"p{i}", "question": f"Describe image {i}.", "images": [images[i % num_images]]}
               for i in range(pairs_per_round)]
    _jsonl(root / "prompts.jsonl", prompts)
    written: dict = {"pairs": {}, "samples": {}, "verdicts": {}}
    for r in (1, 2):
        work = root if r == 1 else root / f"round-{r}"
        samples, verdicts, pairs = [], [], []
        for i, p in enumerate(prompts):
            pid = p["prompt_id"]
            hi, lo = 0.5 + (i % 6) / 10, (i % 5) / 10  # margins from 0.1 to 1.0
            for k, (score, tokens) in enumerate([(hi, 10 + i % 7), (lo, 12 + i % 3)]):
                samples.append({"sample_id": f"{pid}#s{k}", "prompt_id": pid, "text": "a" * tokens, "reasoning": "",
                                "answer": "a", "answer_parsed": k == 0, "num_tokens": tokens,
                                "finish_reason": "length" if i % 10 == 0 and k else "stop"})
                verdicts.append({"sample_id": f"{pid}#s{k}", "prompt_id": pid, "judge": "fake", "status": "ok",
                                 "score": score, "scores": {"hallucination": score, "correctness": 1 - score},
                                 "rationale": "fine", "error": None})
            verdicts.append({"sample_id": f"{pid}#s2", "prompt_id": pid, "judge": "fake", "status": "failed",
                             "score": None, "scores": {}, "rationale": "", "error": "invalid: no JSON" if i % 2 else "refused: 400"})
            note = f"the {TOKEN} is extra" if r == 2 and i % 7 == 0 else "matches the image"
            pairs.append({"pair_id": f"{pid}#s0>{pid}#s1", "prompt_id": pid, "prompt": _conv("user", "template " + pid),
                          "chosen": _conv("assistant", "a" * (10 + i % 7)), "rejected": _conv("assistant", "a" * (12 + i % 3)),
                          "images": p["images"], "margin": round(hi - lo, 10), "chosen_score": hi, "rejected_score": lo,
                          "chosen_rationale": note, "rejected_rationale": "wrong colour",
                          "chosen_id": f"{pid}#s0", "rejected_id": f"{pid}#s1"})
        _jsonl(work / "samples.jsonl", samples)
        _jsonl(work / "verdicts.jsonl", verdicts)
        _jsonl(work / "pairs.jsonl", pairs)
        (work / "judge_report.json").write_text(json.dumps({
            "self_consistency": {"samples": 10, "mean_abs_diff": 0.1, "exact_agreement": 0.5},
            "position": None, "reference_agreement": None}))
        _jsonl(work / "train" / "metrics.jsonl",
               [{"step": s, "loss": 0.7 - s / 100, "rewards/margins": s / 50, "epoch": 1.0} for s in range(1, 21)])
        written["pairs"][r], written["samples"][r], written["verdicts"][r] = pairs, samples, verdicts
    for label, chair in (("base", 0.4), ("round-2", 0.2)):
        (root / "eval" / label).mkdir(parents=True)
        (root / "eval" / label / "results.json").write_text(json.dumps(
            {"describe": {"chair_i": chair, "chair_i_ci": [chair - 0.05, chair + 0.05], "chair_s": chair * 2, "answers": 40},
             "policy": label, "failed_prompts": []}))
    state = {"prompts": {"status": "done", "summary": {"seconds": 0.1}}}
    for r in (1, 2):
        sfx = "" if r == 1 else f"@round-{r}"
        state |= {f"sample{sfx}": {"status": "done", "summary": {"seconds": 30.0}},
                  f"judge{sfx}": {"status": "done", "summary": {"seconds": 12.5, "requests": 100 * r, "cached": 3,
                                                                "usage": {"prompt_tokens": 1000}, "cost": 0.25}},
                  f"pairs{sfx}": {"status": "done", "summary": {"seconds": 0.5, "skipped": {"failed verdicts": pairs_per_round}}},
                  f"train{sfx}": {"status": "done", "summary": {"seconds": 60.0}}}
    (root / "stages.json").write_text(json.dumps(state))
    (root / "recipe.yaml").write_text("output_dir: fake\n")
    written["images"] = images
    return written


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-run")
    return root, fake_run(root)


def test_histogram_matches_a_hand_count():
    h = histogram([0.0, 0.05, 0.1, 0.5, 0.99, 1.0], bins=10)
    assert h["counts"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]  # 1.0 falls in the last, closed bin
    assert h["edges"][0] == 0.0 and h["edges"][-1] == 1.0
    assert histogram([-1.0, 3.0], bins=4)["edges"] == [-1.0, 0.0, 1.0, 2.0, 3.0]  # widened to the values


def test_report_figures_match_hand_counts(fake):
    root, written = fake
    data = report_data(root)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    r1, pairs, samples = data["rounds"][0], written["pairs"][1], written["samples"][1]
    assert r1["samples"]["truncated"] == sum(s["finish_reason"] == "length" for s in samples) == 150
    assert r1["samples"]["unparsed"] == 1500
    judge = r1["judge"]
    assert judge["total"] == 4500 and judge["ok"] == 3000
    assert judge["failures"] == {"invalid": 750, "refused": 750}
    assert set(judge["scores"]) == {"score", "hallucination", "correctness"}
    ok_scores = [v["score"] for v in written["verdicts"][1] if v["status"] == "ok"]
    assert judge["scores"]["score"]["counts"][9] == sum(s >= 0.9 for s in ok_scores)
    assert judge["self_consistency"]["samples"] == 10 and judge["position"] is None
    assert judge["usage"]["requests"] == 100 and judge["usage"]["prompt_tokens"] == 1000

    p = r1["pairs"]
    assert p["count"] == 1500 and p["skipped"] == {"failed verdicts": 1500}
    margins = [x["margin"] for x in pairs]
    assert sum(p["margin"]["counts"]) == 1500
    assert p["margin"]["counts"][9] == sum(m >= 0.9 for m in margins)
    assert p["length"]["unit"] == "tokens"
    tokens = {s["sample_id"]: s["num_tokens"] for s in samples}
    longer = sum(tokens[x["chosen_id"]] > tokens[x["rejected_id"]] for x in pairs)
    assert p["length"]["chosen_longer"] == longer
    assert p["length"]["chosen_shorter"] == sum(tokens[x["chosen_id"]] < tokens[x["rejected_id"]] for x in pairs)

    assert list(r1["train"])[:2] == ["loss", "rewards/margins"] and "epoch" not in r1["train"]
    assert r1["train"]["loss"][0] == [1, 0.69]
    ev = data["eval"]
    assert ev["labels"] == ["base", "round-2"]
    chair = next(m for m in ev["metrics"] if m["name"] == "describe.chair_i")
    assert chair["values"] == {"base": 0.4, "round-2": 0.2}
    assert chair["ci"]["base"] == pytest.approx([0.35, 0.45])
    assert not any(m["name"].endswith("_ci") for m in ev["metrics"])
    assert not chair["count"] and next(m for m in ev["metrics"] if m["name"] == "describe.answers")["count"]
    assert [c["requests"] for c in data["cost"]] == [100, 200]
    assert next(s for s in data["stages"] if s["key"] == "train@round-2")["seconds"] == 60.0

    assert len(data["pairs"]) == 3000
    assert len(data["images"]) == 40  # each image once, however many pairs show it
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in data["images"].values())
    import base64
    import io

    thumb = Image.open(io.BytesIO(base64.b64decode(data["images"]["i0"].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == 256  # 400x300 scaled down


def test_page_needs_no_network(fake):
    root, _ = fake
    html = render(report_data(root))
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b|@import|url\(", html, re.I)
    # the only absolute URL anywhere is the SVG namespace name (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) == {"http://www.w3.org/2000/svg"}
    assert html.count("<script") == 2 and html.count("</script>") == 2


def test_model_text_cannot_end_the_script(tmp_path):
    _jsonl(tmp_path / "pairs.jsonl", [{
        "pair_id": "a>b", "prompt_id": "p", "prompt": _conv("user", "q"), "images": [],
        "chosen": _conv("assistant", "</script><script>alert(1)</script>"), "rejected": _conv("assistant", "<b>x</b>"),
        "margin": 0.5, "chosen_score": 1.0, "rejected_score": 0.5}])
    (tmp_path / "stages.json").write_text("{}")
    html = render(report_data(tmp_path))
    assert html.count("</script>") == 2 and "<script>alert" not in html


def test_sections_without_data_are_none(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps({"prompts": {"status": "running"}}))
    data = report_data(tmp_path)
    r = data["rounds"][0]
    assert (r["samples"], r["judge"], r["pairs"], r["train"], data["eval"], data["sft"]) == (None,) * 6
    assert data["pairs"] == [] and data["cost"] == []
    assert write_report(tmp_path).read_text().startswith("<!DOCTYPE html>")


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RecordError, match="not a run directory"):
        report_data(tmp_path)
    (tmp_path / "stages.json").write_text("{}")
    (tmp_path / "pairs.jsonl").write_text('{"pair_id": 1}\nnot json\n')
    with pytest.raises(RecordError, match=r"pairs.jsonl:2: not valid JSON"):
        report_data(tmp_path)
    res = subprocess.run([sys.executable, "-m", "alignkit", "report", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "not a run directory" in res.stderr and "Traceback" not in res.stderr


def test_run_writes_the_report_and_a_failing_report_fails_nothing(tmp_path, monkeypatch, capsys):
    from alignkit.recipe import load_recipe
    from alignkit.runner import Runner

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages: [prompts]\ndata: {{synthetic: {{num_prompts: 2}}}}\n")
    Runner(load_recipe(recipe)).run()
    assert (tmp_path / "run" / "report.html").is_file()

    def broken(root, out=None):
        raise OSError("[Errno 28] disk full")

    monkeypatch.setattr("alignkit.report.write_report", broken)
    capsys.readouterr()
    results = Runner(load_recipe(recipe, ["data.synthetic.num_prompts=3"])).run()
    assert results["prompts"]["num_prompts"] == 3  # the stage's work stands
    out = capsys.readouterr().out
    assert "the run report could not be written (OSError: [Errno 28] disk full)" in out and "alignkit report" in out


# ---------------------------------------------------------------------------------------------
# in a real browser


def _open(browser, html: Path, screenshot: Path | None = None):
    """Open a report from a file:// URL with every other request refused; return the page and the
    console errors, uncaught exceptions and refused requests seen while it loaded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))

    def route(r):
        if r.request.url.startswith(("file://", "data:")):
            return r.continue_()
        errors.append(f"network request: {r.request.url}")
        return r.abort()

    page.route("**/*", route)
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return page, errors


def _charts_drawn(page) -> int:
    """How many SVG charts hold marks (bars, lines or dots)."""
    return page.eval_on_selector_all("svg.chart", "svgs => svgs.filter(s => s.querySelector('rect, path, circle')).length")


def _matching(page) -> int:
    return int(page.get_attribute("#pair-count", "data-matching"))


def _rows(page) -> int:
    return page.locator("#pair-rows .pair").count()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.mark.slow
def test_viewer_filters_and_search_in_chromium(fake, browser):
    root, written = fake
    html = write_report(root)
    page, errors = _open(browser, html)
    assert _charts_drawn(page) >= 20, "plots missing"
    pairs = [p for r in (1, 2) for p in written["pairs"][r]]
    assert _matching(page) == 3000 and _rows(page) == 50  # paged: 50 rows at a time
    first = page.locator("#pair-rows .pair").first
    assert "round 1 · prompt p5 · margin 1\n" in first.inner_text()  # largest margin first, ties in file order
    assert first.locator("img").get_attribute("src").startswith("data:image/jpeg")

    started = time.monotonic()
    page.fill("#f-margin-min", "0.75")
    assert _matching(page) == sum(p["margin"] >= 0.75 for p in pairs)
    assert time.monotonic() - started < 2.0  # filtering 3000 pairs does not freeze the page
    page.fill("#f-rejected-max", "0.15")
    assert _matching(page) == sum(p["margin"] >= 0.75 and p["rejected_score"] <= 0.15 for p in pairs)
    page.fill("#f-margin-min", "")
    page.fill("#f-rejected-max", "")
    page.select_option("#f-round", "2")
    assert _matching(page) == 1500
    page.fill("#f-prompt", "p12")  # p12, p120..p129, p1200..p1299
    assert _matching(page) == sum("p12" in p["prompt_id"] for p in written["pairs"][2]) == 111
    page.fill("#f-prompt", "")
    page.select_option("#f-round", "")

    page.fill("#f-search", TOKEN.upper())  # case-insensitive
    page.wait_for_function(f"document.getElementById('pair-count').dataset.matching === '{sum(TOKEN in p['chosen_rationale'] for p in pairs)}'")
    assert _matching(page) == 215 and _rows(page) == 50
    assert all(TOKEN in t for t in page.locator("#pair-rows .pair").all_inner_texts())
    page.click("#page-next")
    assert _rows(page) == 50 and "51–100 of 215" in page.inner_text("#pair-count")
    page.fill("#f-search", "no such text anywhere")
    page.wait_for_function("document.getElementById('pair-count').dataset.matching === '0'")
    assert _rows(page) == 0 and "No pair matches" in page.inner_text("#pair-rows")
    assert errors == []
    page.close()


@pytest.mark.slow
def test_report_of_a_real_run_in_chromium(tmp_path, tiny_qwen_dir, browser):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
output_dir: {tmp_path / 'run'}
stages: [prompts, sample, judge, pairs, train, eval]
policy: {{model: {tiny_qwen_dir}}}
data: {{synthetic: {{num_prompts: 6, seed: 0}}}}
sample: {{backend: transformers, num_samples: 4, max_new_tokens: 16}}
pairs: {{strategy: threshold}}
train: {{max_steps: 2, batch_size: 2, save_steps: 2}}
eval: {{synthetic: {{num_prompts: 4, seed: 9}}, max_new_tokens: 16, judge: false}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "alignkit", "run", str(recipe)], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    html = run / "report.html"
    assert html.is_file() and "report:" in res.stdout  # `alignkit run` wrote it at the end
    res = subprocess.run([sys.executable, "-m", "alignkit", "report", str(run), "--out", str(tmp_path / "again.html")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and (tmp_path / "again.html").is_file(), res.stderr

    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    page, errors = _open(browser, html)
    assert _charts_drawn(page) >= 10
    assert _matching(page) == len(pairs) > 0
    body = page.inner_text("body")
    assert "No evaluation" not in body and "No training metrics" not in body
    # the README's screenshots are re-taken only when asked (ALIGNKIT_SCREENSHOTS=1), so a test run
    # leaves the checkout clean
    docs = ROOT / "docs" if os.environ.get("ALIGNKIT_SCREENSHOTS") else tmp_path
    docs.mkdir(exist_ok=True)
    page.screenshot(path=str(docs / "report-overview.png"))
    for section in ("training", "eval", "pairs"):
        page.evaluate(f"document.getElementById('{section}').scrollIntoView()")
        page.screenshot(path=str(docs / f"report-{section}.png"))
    margin = max(p["margin"] for p in pairs)
    page.fill("#f-margin-min", str(margin))
    assert _matching(page) == sum(p["margin"] >= margin for p in pairs)
    assert errors == []
    page.close()
