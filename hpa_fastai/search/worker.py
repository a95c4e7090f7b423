"""A worker process of ``run.py tune --jobs J``: ``python -m hpa_fastai.search.worker STUDY_FOLDER``
runs trials of the study whose settings the folder's tune.json holds (the storage URL, with its
password, comes in the environment) until the study is done. The ``tune`` command starts J of them
and reports what they finish; each one's messages go to its log in the study's ``workers/`` folder."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from ..errors import HPAError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="fastai")
    import optuna

    from ..runs.files import read_json_file
    from ..runs.folder import TUNE
    from .objective import run_trials
    from .run import search_from_settings

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module logs one line per trial itself
    log = logging.getLogger("hpa_fastai.search.worker")
    if len(argv) != 1:
        log.error("usage: python -m hpa_fastai.search.worker STUDY_FOLDER")
        return 2
    folder = Path(argv[0])
    try:
        settings = read_json_file(folder / TUNE, "search settings")
        if not isinstance(settings, dict):
            raise HPAError(f"{folder / TUNE}: not the settings of a search (not a JSON object)")
        search = search_from_settings(folder, settings)
        ran = run_trials(search, on_trial=lambda r: log.info(
            f"trial {r.row['number']} {r.row['state']}: value {r.row['value']} ({r.row['reason'] or ''})"))
    except HPAError as e:
        log.error(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    log.info(f"done: ran {ran} trial(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
