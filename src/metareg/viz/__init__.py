"""Plots (matplotlib, optional dependency ``metareg[plot]``)."""
