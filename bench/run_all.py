"""Run every benchmark in turn and finish with a summary of each against its target; all of it
is appended to bench/results.md.

    python bench/run_all.py                      # defaults: a few minutes each on a 2-core CPU
    python bench/run_all.py --threads 1          # flags after the script go to every benchmark
    python bench/run_all.py --only cache,inference
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

import _common as C

BENCHMARKS = ["train_step", "data_pipeline", "cache", "inference", "memory"]


def summary(results: dict, failed: list) -> list[dict]:
    def get(name, key, spec=".3f"):
        if name not in results:
            return "failed" if name in failed else "not run"
        value = results[name].get(key)
        return format(value, spec) if isinstance(value, float) else str(value)

    rows = [{"benchmark": "training step: Learner / plain PyTorch loop", "target": "≥ 0.97",
             "measured": get("train_step", "ratio")}]
    pipeline = results.get("data_pipeline") or {"": get("data_pipeline", "")}
    for setting, value in pipeline.items():
        rows.append({"benchmark": f"data pipeline: DataLoader / bare decode, {setting}".rstrip(", "),
                     "target": "≥ 0.85", "measured": value if isinstance(value, str) else f"{value:.3f}"})
    rows += [{"benchmark": "cache: DataLoader epoch speed-up over PNGs", "target": "≥ 5",
              "measured": get("cache", "ratio", ".2f")},
             {"benchmark": "cache: tensors identical to decoding the PNGs", "target": "yes",
              "measured": {"True": "yes", "False": "NO"}.get(get("cache", "identical"), get("cache", "identical"))},
             {"benchmark": "inference: Predictor / plain no_grad loop", "target": "≥ 0.9",
              "measured": get("inference", "ratio")},
             {"benchmark": "memory: peak RSS of training, MiB", "target": "", "measured": get("memory", "train_mib", ".0f")},
             {"benchmark": "memory: peak RSS of predict, MiB", "target": "", "measured": get("memory", "predict_mib", ".0f")},
             {"benchmark": "GPU", "target": "", "measured": "not measured here: run bench/gpu.py on a GPU"}]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description="run every benchmark", add_help=True)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args, passed_on = p.parse_known_args()
    names = args.only.split(",") if args.only else BENCHMARKS
    results, failed = {}, []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = importlib.import_module(name).main(passed_on)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - t0:.0f}s)", flush=True)
    threads = passed_on[passed_on.index("--threads") + 1] if "--threads" in passed_on else "default"
    C.record("Summary: measured against targets", summary(results, failed), {"benchmarks": ",".join(names), "torch threads": threads},
             [f"failed: {', '.join(failed)}"] if failed else [], record="--no-record" not in passed_on)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
