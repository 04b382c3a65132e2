"""Workbook tooling, apart from the method: the headless runner `diem-run`, notebook parameters,
`metrics.json` and the figures the notebooks share."""

from .metrics import write_metrics

__all__ = ["write_metrics"]
