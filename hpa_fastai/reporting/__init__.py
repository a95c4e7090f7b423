"""Run reports for people: a self-contained report.html per run, a page comparing runs, the page of a
hyperparameter search (tune.html), a summary in TensorBoard, and the report in the MLflow and W&B runs."""
from __future__ import annotations

from importlib import import_module

# Loaded on first use: the modules behind these names import the run-folder helpers, and with them
# fastai, which a caller that only imports the package should not pay for.
_EXPORTS = {"write_report": "html", "write_comparison": "html", "render_report": "html", "render_comparison": "html",
            "log_tensorboard_summary": "tensorboard", "valid_samples": "samples", "write_tune_report": "tune",
            "render_tune_report": "tune", "log_report_to_trackers": "trackers"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
