"""What the console shows: alignkit's own lines and progress bars, and only what matters from the libraries.

By default other libraries log at warning level, and vLLM's engine-start chatter (its INFO lines and
the warnings it prints on every start that mean nothing to a user) is hidden; `alignkit -v` shows
everything at INFO. `configure` sets this once per process, before vLLM, transformers or datasets
are imported: most of it through environment variables, which every process started from here
inherits (vLLM's engine processes, a launch's workers, which call `configure` too).

Progress bars are tqdm's, through `progress`: named, sized to the terminal, and shown by the main
process of a launch only.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

VERBOSE_ENV = "ALIGNKIT_VERBOSE"

# Set unless the user set them already; `-v` overrides them with VERBOSE.
QUIET = {
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM's warnings are engine-start notices (no Triton, eager mode, dtypes)
    "TRANSFORMERS_VERBOSITY": "warning",
    "DATASETS_VERBOSITY": "warning",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Casting the dataset", "Map": instant on our sizes
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ notices in vLLM's workers (NUMA binding)
    # a CUDA build of torch on a machine without a GPU says so in every process that imports vLLM
    "TORCH_LOGS": "-torch.utils.cpp_extension",
    # deprecations inside the libraries (torch.distributed.reduce_op in vLLM) are for their authors
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
VERBOSE = {
    "VLLM_LOGGING_LEVEL": "INFO",
    "TRANSFORMERS_VERBOSITY": "info",
    "DATASETS_VERBOSITY": "info",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "0",
    "TORCH_CPP_LOG_LEVEL": "INFO",
}
# Loggers whose warnings are chatter, in this process: vLLM's import-time notices (it configures its
# logging later, as an engine starts), torch's (imported before `configure`: see TORCH_LOGS), and the
# Qwen-VL video processors', on the dummy video vLLM profiles at every engine start of an image run.
CHATTY = ("vllm", "torch.utils.cpp_extension", "transformers.models.qwen2_vl.video_processing_qwen2_vl",
          "transformers.models.qwen3_vl.video_processing_qwen3_vl")  # fmt: skip


def verbose() -> bool:
    """Whether this run shows the libraries' INFO logs (`alignkit -v`, or ALIGNKIT_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose_logs: bool | None = None) -> None:
    """Set the libraries' logging for this process and every process it starts; None: keep the
    environment's choice (a launch's worker inherits its runner's)."""
    if verbose_logs is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose_logs else "0"
    if verbose():
        os.environ.update(VERBOSE)
        for name in ("TORCH_LOGS", "PYTHONWARNINGS"):
            if os.environ.get(name) == QUIET[name]:
                del os.environ[name]
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    logging.getLogger().setLevel(logging.WARNING)  # accelerate, peft, trl, httpx, ... (no handler: stderr)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):  # PYTHONWARNINGS is read at start-up only
        warnings.filterwarnings("ignore", category=category)
    # transformers' own bars ("Loading weights", "Writing model shards") are off when the hub's
    # global switch is off as it is imported; the hub's download bars stay on (large models take minutes)
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:  # the user's choice wins
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        disable_progress_bars()
        enable_progress_bars("huggingface_hub")


def progress(iterable: Iterable[Any] | None = None, *, desc: str, **kwargs: Any) -> tqdm:
    """A progress bar named `desc` (tqdm's arguments), shown by the main process of a launch only."""
    kwargs.setdefault("disable", os.environ.get("RANK", "0") != "0")
    return tqdm(iterable, desc=desc, dynamic_ncols=True, **kwargs)
