"""Hyperparameter search: ``run.py tune``'s study of many training runs drawn by Optuna from a search
space (``space``), its storage, workers, pruning, faults and confirmation (``study``), and the fastai
callback that reports a fit to an Optuna trial (``callback``). It sits above training, whose door
each trial goes through, and beside inference, which it never imports."""
from .callback import OptunaPruning
from .space import Param, Space, default_space, read_space, space_from_dict
from .study import TrialReport, TuneResult, tune

__all__ = ["tune", "TuneResult", "TrialReport", "OptunaPruning", "Space", "Param", "default_space", "read_space",
           "space_from_dict"]
