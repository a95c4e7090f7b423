"""A finished run's report (report.html) in the MLflow and W&B runs that training recorded into:
the tracker runs are closed by then, so each is opened again by the id in the run folder's
trackers.json (where it is recorded comes from the environment, as when it trained)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import trackers
from ..runs.files import read_config, read_tracker_ids
from ..runs.folder import REPORT
from ..training.trackers import mlflow_client, wandb_init

logger = logging.getLogger(__name__)


def log_report_to_trackers(run_dir) -> list[str]:
    """Add ``report.html`` to the run's MLflow and W&B runs; returns the trackers that took it. A
    tracker that cannot be reached is noted in the log; the report stays in the run folder."""
    run_dir = Path(run_dir)
    names = [n for n in trackers(read_config(run_dir).get("log")) if n in ("mlflow", "wandb")]
    ids = read_tracker_ids(run_dir)
    done = []
    for name in names:
        if name not in ids or not (run_dir / REPORT).is_file():
            continue
        try:
            if name == "mlflow":
                client, _ = mlflow_client(run_dir.parent)
                client.log_artifact(ids[name], str(run_dir / REPORT))
            else:
                run = wandb_init(run_dir, ids[name])
                run.save(str(run_dir / REPORT), base_path=str(run_dir), policy="now")
                run.finish()
            done.append(name)
        except Exception as e:  # a tracker server away, a store deleted: the report is still in the run folder
            logger.warning(f"note: report.html not added to the {name} run {ids[name]} ({type(e).__name__}: {e})")
    return done
