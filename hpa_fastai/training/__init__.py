"""Training: the Learner, its callbacks and checkpoints, the schedule, one run start to finish,
cross-validation and several processes."""
