"""Meta-learning schemes (axis 3) and the meta-training loop."""

from .bilevel import MAML, BilevelLearner, MetaSGD, select_fast

__all__ = ["MAML", "BilevelLearner", "MetaSGD", "select_fast"]
