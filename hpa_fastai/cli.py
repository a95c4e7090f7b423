"""Command line: flags generated one-to-one from the config dataclasses; training is the default command."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings

from .config import (DedupConfig, EvaluateConfig, ExportConfig, PredictConfig, PreprocessConfig, ReportConfig,
                     RunsConfig, SynthConfig, TrainConfig)
from .errors import HPAError

# name -> (config class, help, "module:function" that runs it)
COMMANDS = {
    "train": (TrainConfig, "train a model (the default command)", "train:train"),
    "lr-find": (TrainConfig, "run only the learning-rate finder and save its plot", "train:lr_find_only"),
    "predict": (PredictConfig, "predict labels: a Kaggle submission, or labels for a folder of images",
                "predict:predict_command"),
    "evaluate": (EvaluateConfig, "score a trained model on a labelled folder: table, CSV and plots",
                 "predict:evaluate_command"),
    "export": (ExportConfig, "export a trained model, e.g. to ONNX", "export:export_command"),
    "runs": (RunsConfig, "a table of all runs under runs/", "runs:runs_command"),
    "report": (ReportConfig, "rebuild a run's report.html, or compare several runs", "report:report_command"),
    "cv": (TrainConfig, "K-fold cross-validation: one run per fold, out-of-fold thresholds and scores", "cv:cv_command"),
    "preprocess": (PreprocessConfig, "write a resized copy of a data set that training reads directly",
                   "preprocess:preprocess_command"),
    "dedup": (DedupConfig, "find near-duplicate images by perceptual hash; splits keep each group together",
              "dedup:dedup_command"),
    "synth": (SynthConfig, "write a synthetic HPA-like data set in a competition's layout", "synth_cli:synth_command"),
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def arch_name(text: str) -> str:
    from .models import check_arch

    try:
        return check_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Flags whose values need more than their annotation says.
SPECIAL_TYPES = {"epochs": positive_int, "size": positive_int, "bs": positive_int, "n_train": positive_int,
                 "lr_find_iters": positive_int, "patience": positive_int, "arch": arch_name}


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        tp = _base_type(hints[f.name])
        default_txt = "" if f.default is None else f" (default: {f.default})"
        if meta.pop("positional", False):
            parser.add_argument(f.name, default=f.default, help=help_text + default_txt, **meta)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text + default_txt)
        else:
            parser.add_argument(flag, type=SPECIAL_TYPES.get(f.name, tp), default=f.default,
                                help=help_text + default_txt, metavar=None if "choices" in meta else f.name.upper(),
                                **meta)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before a bad-flag message; keep the project's one-line errors."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(command: str) -> argparse.ArgumentParser:
    cls, help_text, _ = COMMANDS[command]
    prog = "run.py" if command == "train" else f"run.py {command}"
    epilog = None
    if command == "train":
        epilog = "other commands (run.py COMMAND --help):\n" + "\n".join(
            f"  {name:10s} {text}" for name, (_, text, _) in COMMANDS.items() if name != "train")
    parser = OneLineParser(prog=prog, description=help_text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, cls)
    return parser


def run_command(command: str, cfg) -> None:
    import importlib

    module, func = COMMANDS[command][2].split(":")
    getattr(importlib.import_module(f"hpa_fastai.{module}"), func)(cfg)


def main(argv=None) -> int:
    # torch and fastai warn about their own deprecations on import; users can do nothing about them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="fastai")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parser(command).parse_args(argv)  # exits 2 with a message on a bad flag
    cls = COMMANDS[command][0]
    cfg = cls(**vars(args))
    try:
        run_command(command, cfg)
    except HPAError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
