"""The errors a user can cause by input or configuration.

Each is an `AlignkitError` whose message names the file, key, line or record id and says what to
do. The CLI prints that message alone and exits 2 (`--debug` shows the traceback); anything else
escaping a stage is a bug in alignkit and keeps its traceback.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """A problem with the user's input or configuration, worded for the user."""


class RecipeError(AlignkitError, ValueError):
    """A recipe problem; the message names the file, the key (and line) and what is wrong."""


class RecordError(AlignkitError, ValueError):
    """Bad input data; the message names the file, the line or record id, and the problem."""


class StageInputError(AlignkitError, ValueError):
    """A stage was asked to run before the stage that makes its input, or without its section."""


class ModelError(AlignkitError, ValueError):
    """A model, adapter or processor that cannot be resolved or used as asked."""


class TemplateError(AlignkitError, ValueError):
    """A sampling template (`sample.template`: a built-in name or a YAML file) that cannot be used."""


class SampleError(AlignkitError, ValueError):
    """Sampling cannot run as configured (backend, API key, devices), or every prompt failed."""


class SetupError(AlignkitError, RuntimeError):
    """What a setting needs is missing or not working on this machine: a CUDA GPU, an optional
    package, an engine that will not start, a server that refuses every request."""


class LaunchError(AlignkitError, RuntimeError):
    """A stage started as several processes (`launch.num_processes`) failed; the message names the
    stage and the log that holds its processes' output."""


class SpendCapReached(AlignkitError):
    """The judge stopped at a spending cap (`judge.max_requests`, `judge.max_cost`)."""


class StageIncomplete(AlignkitError):
    """A stage finished what it could, but some of its work failed for a transient reason (timeouts,
    server errors): it is not marked done, and a re-run does exactly the rest."""


class NonFiniteError(AlignkitError):
    """A loss, reward, margin or score that is NaN or infinite: a failure, never a number to train on."""


def finite(value: float, what: str) -> float:
    """`value` if it is a finite number; otherwise stop with an error naming `what` (before any weight
    is updated with it, so no NaN weights are written)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteError(
            f"{what} is {value}: training stops here, before the weights take it (checkpoints so far are "
            "kept). A lower learning rate, or finite rewards and margins in the inputs, usually fix it"
        )
    return value
