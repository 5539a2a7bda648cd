"""alignkit: RLAIF preference alignment for vision-language models.

The loop, one module per stage: prompts (`records`) -> `sample` -> `judge` -> `pairs` -> `train`,
driven by a `recipe` through the `runner`.
"""

__version__ = "0.1.0"
