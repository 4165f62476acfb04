"""User-facing errors.

Every problem a user can cause (bad data, bad config, bad checkpoint, a diverging run) raises a
subclass of :class:`MetaregError`. The command line prints its message on one line and exits
non-zero; library users catch it like any exception.
"""


class MetaregError(Exception):
    """Base class of errors caused by the user's input, reported without a traceback."""


class DataError(MetaregError):
    """Missing, corrupt or insufficient data (e.g. a 30-way task on a 20-class split)."""


class ConfigError(MetaregError):
    """Unknown config key or preset, wrong value type, impossible setting."""


class CheckpointError(MetaregError):
    """Missing, corrupt or foreign checkpoint."""


class DivergenceError(MetaregError):
    """A loss became NaN or Inf during training."""


class DistributedError(MetaregError):
    """A process of a torchrun run stopped, or a collective timed out: the others stop too."""


def one_line(error: BaseException | str, limit: int = 400) -> str:
    """An error's whole message on one line (torch's state-dict mismatches span several lines: the
    first alone says only "Error(s) in loading state_dict for BilevelLearner:"), cut at ``limit``
    characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
