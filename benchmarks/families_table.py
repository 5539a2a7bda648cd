"""Write docs/families.md, the model-family compatibility table, from tests/test_families.py's results.

    uv run python benchmarks/families_table.py            # runs the matrix (about a minute), then writes
    uv run python benchmarks/families_table.py --junit r.xml   # from a report of an earlier run
    uv run python benchmarks/families_table.py --vllm     # also sample each family with vLLM (1-2 min each)
    uv run python benchmarks/families_table.py --junit r.xml --keep-vllm   # vLLM cells of docs/families.md

Each cell is what was measured for that family and stage: "yes", or "no" with the failure's first
line. The vLLM column comes from starting alignkit's vLLM backend on each tiny build and sampling
a one-image and a two-image prompt (too slow for the test suite on CPU); without --vllm it is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from alignkit.records import write_atomic

ROOT = Path(__file__).resolve().parents[1]

# test function -> column, in table order
COLUMNS = {
    "test_sample_with_transformers": "sample (transformers)",
    "test_image_reaches_the_policy": "image reaches the policy",
    "test_second_image_reaches_the_policy": "second image reaches the policy",
    "test_lora_targets_only_the_language_model": "default LoRA targets",
    "test_reward_model_scores_see_the_image": "reward model score",
    "test_reward_model_trains": "reward model train",
    "test_sft_two_steps": "SFT",
    "test_dpo_two_steps": "DPO",
    "test_mmdpo_two_steps": "MM-DPO",
    "test_ppo_two_steps": "PPO",
    "test_ppo_value_model_sees_the_image": "image reaches PPO's value model",
    "test_eval_answers_and_scores": "eval",
    "test_quickstart_runs_on_a_local_family_directory": "quickstart recipe (CLI)",
}
# The stage tests' cases with two images per prompt (id `tiny:x+2img`) make one column.
TWO_IMAGES = "two images through the stages"

# Measured outside the matrix (vLLM engines take ~30 s each on CPU).
NOTES = {
    "tiny:qwen2-vl": "vLLM: samples, LoRA applied.",
    "tiny:llava": "Saved with hub vision-tower names (`save_model`): vLLM 0.32 cannot read transformers 5.19's.",
    "tiny:llava-onevision": "vLLM has no LoRA for this architecture: the vLLM backend samples from a merged copy.",
    "tiny:gemma3": "Chat template has no system role (system text opens the first user turn). Saved with hub "
    "vision-tower names, as LLaVA.",
    "tiny:smolvlm": "SmolVLM2's own classes (`SmolVLMProcessor`, which needs `num2words`, and its video processor) "
    "on the Idefics3 build's sizes and tokens. vLLM: samples (vLLM has LoRA for the architecture).",
}


def run_matrix(report: Path) -> None:
    """Run the whole matrix (slow cases included) into a JUnit report; failures still make a table."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_families.py",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)


def vllm_sample(family: str) -> str:
    """Start alignkit's vLLM backend on `family`'s tiny build and sample 2 answers to each of two
    prompts in one call: one with an image, one with two."""
    from PIL import Image

    from alignkit.models import tiny_model
    from alignkit.sample.base import Request
    from alignkit.sample.vllm_backend import make_vllm_backend

    def prompt(images: int) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": "What shape?"}]}]

    red, blue = Image.new("RGB", (112, 112), "red"), Image.new("RGB", (112, 112), "blue")
    requests = [Request("a", prompt(1), [red]), Request("b", prompt(2), [red, blue])]
    options = {"max_model_len": 512, "distributed_executor_backend": "uni", "kv_cache_memory": 0.25}
    try:
        backend = make_vllm_backend(str(tiny_model(family)), max_new_tokens=8, options=options)
        answers = backend.generate(requests, 2, seed=0)
    except Exception as e:  # the table reports any failure
        return "no: " + " ".join(str(e).split())[-160:]
    missing = [
        name for name, a in zip(("1-image", "2-image"), answers) if len(a) != 2 or not all(g.num_tokens for g in a)
    ]
    return f"no: no answers to the {' and '.join(missing)} prompt" if missing else "yes"


def vllm_column(families: list[str]) -> dict[str, str]:
    """family -> vLLM cell, each family in its own process (one engine at a time)."""
    cells = {}
    for family in families:
        cmd = [sys.executable, __file__, "--vllm-one", family]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        last = (done.stdout.strip().splitlines() or ["{}"])[-1]
        cells[family] = json.loads(last).get(family, f"no: the process exited with {done.returncode}")
    return cells


def results(report: Path) -> dict[str, dict[str, str]]:
    """family -> column -> "yes" or "no: <why>", from a JUnit report of tests/test_families.py; a
    family's two-image cases make one cell: "yes" (and how many stages) or the stages that failed."""
    table: dict[str, dict[str, str]] = {}
    two: dict[str, dict[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        m = re.fullmatch(r"(\w+)\[(tiny:[\w.-]+?)(\+2img)?\]", case.get("name", ""))
        if not m or m[1] not in COLUMNS:
            continue
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            cell = "no: " + (bad.get("message") or "failed").splitlines()[0][:120]
        elif skipped is not None:
            cell = "not run: " + (skipped.get("message") or "skipped").splitlines()[0][:120]
        else:
            cell = "yes"
        (two if m[3] else table).setdefault(m[2], {})[COLUMNS[m[1]]] = cell
    for family, cells in two.items():
        failed = [f"{column}: {cell}" for column, cell in cells.items() if cell != "yes"]
        table.setdefault(family, {})[TWO_IMAGES] = "; ".join(failed) if failed else f"yes ({len(cells)} stages)"
    return table


def earlier_column(path: Path, column: str) -> dict[str, str]:
    """family -> cell of `column` in an earlier table written by `markdown` (empty if it has none)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("| ")]  # fmt: skip
    if not rows or column not in rows[0]:
        return {}
    at = rows[0].index(column)
    return {row[0].strip("`"): row[at] for row in rows[1:]}


def markdown(table: dict[str, dict[str, str]]) -> str:
    vllm = ["sample (vLLM)"] if any("sample (vLLM)" in row for row in table.values()) else []
    columns = [*COLUMNS.values(), TWO_IMAGES, *vllm]
    head = ["family", *columns, "notes"]
    lines = [
        "# Model families",
        "",
        "Generated by `benchmarks/families_table.py` from `tests/test_families.py` (tiny offline builds,",
        "`alignkit make-tiny-model <name> DIR`; each cell is a test that ran). Image reaches the policy: the",
        "forward log-probs of a fixed answer change when only the image changes (the second image: of a",
        "prompt with two). Image reaches PPO's value model: the value estimates of fixed answer tokens",
        "change, for the shared value head and a separate critic. PPO: two steps with transformers",
        "rollouts, LoRA and the reference judge's reward. Two images through the stages: transformers",
        "sampling, reward model score and train, SFT, DPO, MM-DPO, PPO, PPO's value model and eval on",
        'prompts with two images (tested for the families in `SEVERAL`; "not run" for the others).',
        "Sample (vLLM): a one-image and a two-image prompt in one call (`--vllm`).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for family in sorted(table):
        cells = [table[family].get(c, "not run") for c in columns]
        lines.append("| " + " | ".join([f"`{family}`", *cells, NOTES.get(family, "")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="a JUnit report of tests/test_families.py (default: run it)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "families.md")
    parser.add_argument("--vllm", action="store_true", help="add the vLLM sampling column")
    parser.add_argument(
        "--keep-vllm",
        action="store_true",
        help="keep the vLLM column of the table at --out (sample only families it lacks)",
    )
    parser.add_argument("--vllm-one", metavar="FAMILY", help=argparse.SUPPRESS)  # one family, as JSON (internal)
    args = parser.parse_args()
    if args.vllm_one:
        print(json.dumps({args.vllm_one: vllm_sample(args.vllm_one)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = args.junit
        if report is None:
            report = Path(tmp) / "families.xml"
            run_matrix(report)
        table = results(report)
        if args.vllm:
            for family, cell in vllm_column(sorted(table)).items():
                table[family]["sample (vLLM)"] = cell
        elif args.keep_vllm:  # the earlier table's cells; families new since then are sampled now
            earlier = earlier_column(args.out, "sample (vLLM)")
            fresh = vllm_column([f for f in sorted(table) if f not in earlier])
            for family in table:
                table[family]["sample (vLLM)"] = earlier.get(family) or fresh[family]
        write_atomic(args.out, markdown(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
