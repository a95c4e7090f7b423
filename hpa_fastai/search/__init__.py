"""Hyperparameter search: ``run.py tune``'s door (``run``: the study folder, the confirmation of the
best trial), the search space (``space``), the study with its storage, sampler and pruner
(``study``), running trials (``objective``), the workers and their faults (``workers``), what the
trials show (``trials``), the ``--jobs`` worker process (``worker``), and the fastai callback that
reports a fit to an Optuna trial (``callback``). It sits above training, whose door
each trial goes through, and beside inference, which it never imports."""
from .callback import OptunaPruning
from .space import Param, Space, default_space, read_space, space_from_dict
from .run import TuneResult, tune
from .trials import TrialReport

__all__ = ["tune", "TuneResult", "TrialReport", "OptunaPruning", "Space", "Param", "default_space", "read_space",
           "space_from_dict"]
