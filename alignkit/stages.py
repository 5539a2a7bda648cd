"""The pipeline: every stage in the order they run. The CLI's stage commands and the recipe's
`stages` key are made from this list; a new stage is registered here, once."""

from __future__ import annotations

from alignkit.data.stage import PromptsStage
from alignkit.evaluate.stage import EvalStage
from alignkit.judge.stage import JudgeStage
from alignkit.pairs.stage import PairsStage
from alignkit.reward.score_stage import ScoreStage
from alignkit.reward.stage import RewardModelStage
from alignkit.sample.stage import SampleStage
from alignkit.stage import Stage
from alignkit.train.sft_stage import SftStage
from alignkit.train.stage import TrainStage

STAGES: tuple[Stage, ...] = (
    SftStage(), PromptsStage(), SampleStage(), JudgeStage(), PairsStage(), RewardModelStage(), ScoreStage(),
    TrainStage(), EvalStage(),
)  # fmt: skip
STAGE_NAMES = tuple(s.name for s in STAGES)
# The critique reward model stages, SFT and eval are opt-in: list them in a recipe's `stages`.
DEFAULT_STAGES = ("prompts", "sample", "judge", "pairs", "train")
