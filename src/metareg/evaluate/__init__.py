"""Evaluation: scores over fixed episode streams, confidence intervals, paired comparisons."""

from .episodes import EvalResult, episode_stream, evaluate
from .stats import Estimate, mean_ci, paired_difference

__all__ = ["Estimate", "EvalResult", "episode_stream", "evaluate", "mean_ci", "paired_difference"]
