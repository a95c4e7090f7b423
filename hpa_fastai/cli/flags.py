"""Flags generated one-to-one from the config dataclasses, checked by the configs' own constraints;
training is the default command. Nothing heavy is imported until a command runs."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
import warnings

from ..config import validate
from ..console import attach_logging, console
from ..errors import HPAError
from .commands import COMMANDS, TAKES_GIVEN_FLAGS


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = {k: v for k, v in f.metadata.items() if k != "check"}
        help_text = meta.pop("help")
        tp = _base_type(hints[f.name])
        default_txt = "" if f.default is None else f" (default: {f.default})"
        if meta.pop("positional", False):
            parser.add_argument(f.name, default=f.default, help=help_text + default_txt, **meta)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text + default_txt)
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_text + default_txt,
                                metavar=None if "choices" in meta else f.name.upper(), **meta)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before a bad-flag message; keep the project's one-line errors."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def given_flags(command: str, argv: list[str]) -> frozenset[str]:
    """The config fields whose flags ``argv`` gives (parsed again with no defaults, so whatever is
    left is what the user typed): ``tune`` holds them fixed and searches the rest."""
    parser = build_parser(command)
    for action in parser._actions:  # argparse has no public way to drop every default at once
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def build_parser(command: str) -> argparse.ArgumentParser:
    cls, help_text, _ = COMMANDS[command]
    prog = "run.py" if command == "train" else f"run.py {command}"
    epilog = None
    if command == "train":
        width = max(map(len, COMMANDS))
        epilog = "other commands (run.py COMMAND --help):\n" + "\n".join(
            f"  {name:{width}s} {text}" for name, (_, text, _) in COMMANDS.items() if name != "train")
    parser = OneLineParser(prog=prog, description=help_text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, cls)
    return parser


def main(argv=None) -> int:
    # torch and fastai warn about their own deprecations on import; users can do nothing about them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="fastai")
    attach_logging()
    # one process speaks for a distributed run (torchrun and accelerate set RANK in each process)
    console.quiet = os.environ.get("RANK", "0") not in ("", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parser(command).parse_args(argv)  # exits 2 with a message on a bad flag
    cls, _, run = COMMANDS[command]
    cfg = cls(**vars(args))
    try:
        validate(cfg)  # every value's constraint, before anything is read or built
        if command in TAKES_GIVEN_FLAGS:
            run(cfg, given_flags(command, argv))
        else:
            run(cfg)
    except HPAError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> int:
    """``run.py`` and the ``hpa-fastai`` script: ``main``, then a quick exit. With torch loaded the
    interpreter's final garbage collection walks millions of objects (a second or two); every file
    is closed by then, so the objects are frozen out of it (``gc.freeze``) and the process ends."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    import gc

    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
