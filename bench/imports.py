"""Start-up cost of the model registry with timm deferred to its first use (``models._defer_timm``),
against importing timm up front as fastai would.

fastai.vision.learner imports timm at its own import, for its timm models only; ``models`` stands in
for timm until a ``timm:<name>`` architecture is asked for. This measures what that saves each
process that never builds a timm model (every ``run.py`` command on the built-in architectures),
as whole fresh processes: ``import hpa_fastai.models`` as it is, and the same after ``import timm``.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import _common as C

SIDES = {
    "deferred timm (as shipped)": "import hpa_fastai.models",
    "timm imported first": "import timm; import hpa_fastai.models",
    "timm alone": "import timm",
}


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.set_defaults(rounds=8)
    args = C.parse(p, argv)
    env = {**os.environ, "PYTHONPATH": str(C.REPO), "PYTHONWARNINGS": "ignore"}

    def side(code):
        def run():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
            return time.perf_counter() - t0
        return run

    times = C.interleaved({name: side(code) for name, code in SIDES.items()}, args.rounds, warmup=True)
    deferred, eager = times["deferred timm (as shipped)"], times["timm imported first"]
    saved = [b - a for a, b in zip(deferred, eager)]
    rows = [{"process": name, "median s": statistics.median(t), "best s": min(t)} for name, t in times.items()]
    rows.append({"process": "saved per process (median of rounds)", "median s": statistics.median(saved),
                 "best s": min(eager) - min(deferred)})
    C.record("Start-up: model registry with timm deferred against timm imported", rows, {"rounds": args.rounds},
             [f"deferring timm saves {statistics.median(saved):.2f} s of each process that builds no timm model"],
             record=not args.no_record)
    return {"saved": statistics.median(saved)}


if __name__ == "__main__":
    main()
