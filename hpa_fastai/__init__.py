"""hpa_fastai: multi-label classification of Human Protein Atlas microscopy images with fastai."""
__version__ = "0.1.0"


def load_predictor(path="runs/latest", trust: bool = False, cpu=None):
    """Load a trained model for prediction; see ``hpa_fastai.inference.loading.load_predictor``."""
    from .inference.loading import load_predictor as _load

    return _load(path, trust=trust, cpu=cpu)


# The fastai-native API (``fastai_api``), loaded on first use: ``import hpa_fastai`` stays light.
_FASTAI_API = ("HPADataLoaders", "hpa_dls", "hpa_learner", "tune_thresholds", "export_safe", "show_heatmaps",
               "submission", "OptunaPruning")


def __getattr__(name: str):
    if name in _FASTAI_API:
        from . import fastai_api

        return getattr(fastai_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_FASTAI_API))


__all__ = ["load_predictor", "__version__", *_FASTAI_API]
