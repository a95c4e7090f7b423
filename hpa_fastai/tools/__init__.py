"""One-off data jobs kept apart from the training pipeline: each takes explicit parameters, reports
progress through a ``progress(done, total)`` callback and its messages through ``logging``, and
returns its result; only the command line prints. Nothing in the pipeline imports them."""
