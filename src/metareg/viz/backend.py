"""matplotlib, headless, imported only when a plot is drawn (it is an optional dependency)."""

from __future__ import annotations

from ..errors import ConfigError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or a clear error if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'metareg[plot]'") from None
    return plt
