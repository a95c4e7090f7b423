"""Flags generated one-to-one from the config dataclasses, checked by the configs' own constraints;
training is the default command. Nothing heavy is imported until a command runs."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
import warnings

from ..config import validate
from ..console import attach_logging, console, plain
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


def did_you_mean(word: str, choices) -> str:
    """``; did you mean X?`` for the choice closest to a mistyped ``word``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before a bad-flag message; keep the project's one-line errors,
    with the closest flag for one it does not know."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings]
            unknown = next((w for w in message.split(":", 1)[1].split() if w.startswith("--")), None)
            if unknown is not None:
                message += did_you_mean(unknown.split("=")[0], flags)
        self.exit(2, f"error: {plain(message)} (see {self.prog} --help)\n")


def given_flags(command: str, argv: list[str]) -> frozenset[str]:
    """The config fields whose flags ``argv`` gives (parsed again with no defaults, so whatever is
    left is what the user typed): ``tune`` holds them fixed and searches the rest."""
    parser = build_parser(command)
    for action in parser._actions:  # argparse has no public way to drop every default at once
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def commands_text(prog: str) -> str:
    width = max(map(len, COMMANDS))
    return f"commands ({prog} COMMAND --help for a command's flags):\n" + "\n".join(
        f"  {name:{width}s}  {text}" for name, (_, text, _) in COMMANDS.items())


PROG = "hpa-fastai"  # the installed command; a checkout's run.py and `python -m hpa_fastai` say their own name


def program_name(argv0: str | None = None) -> str:
    """How the user started the command line, for its usage lines: ``hpa-fastai``, ``run.py`` or
    ``python -m hpa_fastai``."""
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    if name == "__main__.py":
        return "python -m hpa_fastai"
    return name if name in ("run.py", PROG) else PROG


def build_parser(command: str, prog: str = PROG) -> argparse.ArgumentParser:
    cls, help_text, _ = COMMANDS[command]
    if command == "train":  # --help: the commands first, then training's flags
        parser = OneLineParser(prog=prog, usage=f"{prog} [COMMAND] [FLAGS]",
                               description=f"{commands_text(prog)}\n\ntrain: {help_text}; its flags:",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        parser = OneLineParser(prog=f"{prog} {command}", description=help_text,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, cls)
    return parser


def main(argv=None, prog: str = PROG) -> int:
    # torch and fastai warn about their own deprecations on import; users can do nothing about them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="fastai")
    attach_logging()
    # one process speaks for a distributed run (torchrun and accelerate set RANK in each process)
    console.quiet = os.environ.get("RANK", "0") not in ("", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        # training takes no positional argument: a first word that is no command is a mistyped one
        print(f"error: unknown command {plain(argv[0])!r:.80}{did_you_mean(argv[0], COMMANDS)} "
              f"(commands: {', '.join(COMMANDS)}; {prog} --help)", file=sys.stderr)
        return 2
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    args = build_parser(command, prog).parse_args(argv)  # exits 2 with a message on a bad flag
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
    """``hpa-fastai``, ``python -m hpa_fastai`` and a checkout's ``run.py``: ``main``, then a quick exit.
    With torch loaded the interpreter's final garbage collection walks millions of objects (a second
    or two); every file is closed by then, so the objects are frozen out of it (``gc.freeze``) and
    the process ends."""
    code = main(prog=program_name())
    sys.stdout.flush()
    sys.stderr.flush()
    import gc

    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
