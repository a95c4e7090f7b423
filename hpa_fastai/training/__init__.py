"""Training: the training door (``train``), cross-validation as a loop around it, the learning-rate
finder alone, and what they are made of: the Learner factory, callbacks, history, checkpoints and
resume, the schedule and several processes."""
from .cv import CvResult, cross_validate
from .run import LrFindResult, RunResult, lr_find, prepare, train

__all__ = ["train", "cross_validate", "lr_find", "prepare", "RunResult", "CvResult", "LrFindResult"]
