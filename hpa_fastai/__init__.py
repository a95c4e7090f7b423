"""hpa_fastai: multi-label classification of Human Protein Atlas microscopy images with fastai."""
__version__ = "0.1.0"


def load_predictor(path="runs/latest", trust: bool = False, cpu=None):
    """Load a trained model for prediction; see ``hpa_fastai.inference.loading.load_predictor``."""
    from .inference.loading import load_predictor as _load

    return _load(path, trust=trust, cpu=cpu)


__all__ = ["load_predictor", "__version__"]
