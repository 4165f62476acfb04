"""Meta-learning schemes (axis 3) and the meta-training loop."""

from .bilevel import BilevelLearner, select_fast

__all__ = ["BilevelLearner", "select_fast"]
