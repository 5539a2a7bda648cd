"""The console of `alignkit run`: the libraries' logs quiet by default and shown with `-v`, a named
progress bar for each long step, and a final summary within 80 columns that prints every path whole.

One run through the real command (vLLM sampling on CPU, the reference judge, 2 DPO steps with TRL),
then sampling and training again with `-v` (about 1.5 minutes alone on 2 cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.cli import shown_path

RECIPE = {
    "output_dir": "run",
    "policy": {"model": "tiny:qwen2-vl"},
    "data": {"synthetic": {"world": "shapes", "num_prompts": 16, "seed": 0}},
    "sample": {"backend": "vllm", "num_samples": 4, "max_new_tokens": 48, "vllm": {"kv_cache_memory": 0.25}},
    "judge": {"backend": "reference", "rubric": "overall"},
    "pairs": {"strategy": "best_worst", "min_margin": 0.0},
    "train": {"method": "dpo", "max_steps": 2, "batch_size": 1, "lora_r": 8, "lora_alpha": 16, "save_steps": 2},
}
# a library's log line: vLLM's `(EngineCore pid=1) INFO 12-01 ...`, Python logging's `INFO name: ...`
LIBRARY_INFO = re.compile(r"(^|\) )INFO \S+")
TRL_DICT_LOG = re.compile(r"\{'loss': ")


def alignkit(cwd: Path, *args: str) -> tuple[str, str]:
    """`alignkit ARGS` run in `cwd` as a user would, 80 columns wide: (stdout, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TRANSFORMERS_", "ALIGNKIT_"))}
    env |= {"COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    for name in ("TORCH_LOGS", "PYTHONWARNINGS", "DATASETS_VERBOSITY", "TORCH_CPP_LOG_LEVEL"):
        env.pop(name, None)  # the defaults under test, not the caller's
    # the installed command, as the README runs it (vLLM's spawned engine processes import its module
    # first, and so start as quiet as the run; `python -m alignkit` leaves them vLLM's import-time notices)
    command = Path(sys.executable).with_name("alignkit")
    proc = subprocess.run([str(command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return proc.stdout, output


def summary(output: str) -> list[str]:
    """The lines after the `outputs` rule, up to the end (of stdout: the bars and warnings are on stderr)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"─+ outputs ─+", line))
    return [line for line in lines[start + 1 :] if line.strip()]


@pytest.mark.slow
def test_quiet_by_default_verbose_with_v_and_a_summary_within_80_columns(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    stdout, quiet = alignkit(tmp_path, "run", "recipe.yaml")

    # the libraries' chatter is hidden: no INFO lines, none of vLLM's engine-start warnings, no raw dicts
    assert not [line for line in quiet.splitlines() if LIBRARY_INFO.search(line)], quiet
    for chatter in ("WARNING", "Triton", "No CUDA runtime", "FutureWarning", "Loading weights",
                    "Loading safetensors", "Casting the dataset", "cap_pixels_per_frame"):  # fmt: skip
        assert chatter not in quiet, quiet
    assert not TRL_DICT_LOG.search(quiet), quiet
    # each long step has a named progress bar
    for bar in ("sample: 100%", "judge overall: 100%", "train: 100%"):
        assert bar in quiet, quiet

    # the summary: within 80 columns, every path whole, relative to the current directory and there
    lines = summary(stdout)
    assert max(len(line) for line in lines) <= 80, lines
    shown = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[-1] for line in lines}
    assert shown["run directory"] == "run" and shown["adapter (PEFT)"] == "run/train/adapter", lines
    for label in ("resolved recipe", "samples", "verdicts", "pairs (TRL format)", "report"):
        assert (tmp_path / shown[label]).exists(), (label, lines)

    # -v: sampling and training again (new settings; the same pairs), with the libraries' INFO logs and TRL's dicts
    _, verbose = alignkit(tmp_path, "-v", "run", "recipe.yaml", "--stages", "sample,train", "sample.max_new_tokens=40",
                       "train.learning_rate=1e-4")  # fmt: skip
    assert re.search(r"\(EngineCore pid=\d+\) INFO ", verbose), verbose  # vLLM's engine
    assert re.search(r"^INFO (transformers|trl|accelerate|peft)", verbose, re.M) or "[transformers]" in verbose, verbose
    assert TRL_DICT_LOG.search(verbose), verbose


def test_shown_path_is_relative_where_shorter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "run" / "pairs.jsonl") == os.path.join("run", "pairs.jsonl")
    assert shown_path(Path("/")) == "/"  # `../../..` would be longer
