"""metareg: meta-learned regularization on one PyTorch engine."""

__version__ = "0.1.0"
