"""The search space of a hyperparameter search: which training flags (``TrainConfig`` fields) a trial
draws, and from what; the built-in space and the TOML file of ``run.py tune --space``.

A space file names fields, each with a range or a list of choices::

    lr = { low = 1e-4, high = 1e-2, log = true }   # a float range, drawn on a log scale
    wd = { low = 0.0, high = 0.1 }
    bs = { choices = [16, 32, 64] }
    freeze_epochs = { low = 0, high = 3 }          # a field of whole numbers: an integer range
    loss = { choices = ["bce", "focal", "asl"] }
    focal_gamma = { low = 0.5, high = 4.0 }        # drawn only for trials that draw the focal loss

A loss's parameters are drawn only with their loss (``losses.LOSS_FLAGS``), ``oversample_cap`` only
when oversampling is on, ``freeze_epochs`` only for a model that starts from ImageNet weights. Every
value is checked before any trial runs as the field's flag is checked (``config.check_field``):
an unknown field, an empty range, a log range through zero or a value the flag refuses is one
error line naming the file and the field. A sampled trial's whole config is then validated as the
command line's is (``config.validate``, and the training door's own checks).
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
import typing
from dataclasses import dataclass
from pathlib import Path

from ..config import MIN_SIZE, TrainConfig, check_field, flag, validate
from ..errors import HPAError

MAX_SPACE_BYTES = 1024 * 1024  # a space file is a few lines
MAX_PARAMS = 64
MAX_CHOICES = 1000
# flags that say where a run reads and writes, or what makes it reproducible: a search holds them fixed
NOT_SEARCHED = {"data": "the data set", "extra_data": "the data set", "out": "where the runs go",
                "resume": "a single run", "seed": "each trial's seed (the confirmation retrains the best "
                                                  "configuration with new ones)",
                "log": "a logger", "keep_checkpoint": "what a run keeps", "workers": "the loader's processes",
                "skip_bad": "the data set", "weights": "a file", "monitor": "the search's objective",
                "compile": "speed, not the model"}
# a field of text that holds a number: ranges of it are drawn as numbers and written as text
NUMBER_AS_TEXT = {"lr"}
DEFAULT_ARCHS = ("resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class Param:
    """One field of the space: a range (``low``..``high``, on a log scale with ``log``, in steps of
    ``step``) or ``choices``."""
    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    @property
    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int)

    def to_json(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, **({"step": self.step} if self.step else {})}

    def distribution(self):
        """The Optuna distribution this parameter is drawn from."""
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.integer:
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        scale = ", log scale" if self.log else ""
        step = f", step {self.step}" if self.step else ""
        return f"{self.low:g} to {self.high:g}{scale}{step}"


def _pretrained_model(cfg: TrainConfig) -> bool:
    from ..models import has_pretrained

    return bool(cfg.pretrained) and has_pretrained(cfg.arch)


def conditions() -> dict:
    """field -> (the field it depends on, a test of the config drawn so far): a loss's parameters
    belong to their loss, the cap to oversampling, frozen epochs to a pretrained model."""
    from ..losses import LOSS_FLAGS

    found = {field: ("loss", lambda cfg, name=name: cfg.loss == name)
             for name, flags in LOSS_FLAGS.items() for field in flags.values()}
    found["oversample_cap"] = ("oversample", lambda cfg: bool(cfg.oversample))
    found["freeze_epochs"] = ("pretrained", _pretrained_model)
    return found


@dataclass(frozen=True)
class Space:
    """The parameters of a search, drawn in an order that puts a field before those that depend on it."""
    params: tuple[Param, ...]

    def __post_init__(self):
        depends = {dep for dep, _ in conditions().values()} | {"arch"}
        ordered = sorted(self.params, key=lambda p: 0 if p.name in depends else 1)  # stable: the file's order
        object.__setattr__(self, "params", tuple(ordered))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_json(self) -> dict:
        return {p.name: p.to_json() for p in self.params}

    def without(self, fixed) -> "Space":
        """The space less the fields held fixed (the flags given on the command line)."""
        return Space(tuple(p for p in self.params if p.name not in set(fixed)))

    def sample(self, trial, base: TrainConfig) -> dict:
        """The values ``trial`` draws (Optuna's define-by-run ``suggest_*``), each field drawn only
        where its condition holds for the config drawn so far."""
        conds, values = conditions(), {}
        for p in self.params:
            if p.name in conds and not conds[p.name][1](dataclasses.replace(base, **as_config_values(values))):
                continue
            if p.choices is not None:
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.integer:
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=p.step or 1)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        return values

    def describe(self) -> dict[str, str]:
        return {p.name: p.describe() for p in self.params}


def as_config_values(params: dict) -> dict:
    """A trial's drawn values as config values (a learning rate drawn as a number is a flag's text)."""
    return {k: repr(float(v)) if k in NUMBER_AS_TEXT and not isinstance(v, str) else v for k, v in params.items()}


def trial_config(base: TrainConfig, params: dict, **overrides) -> TrainConfig:
    """``base`` with a trial's drawn values, validated as the command line's flags are."""
    cfg = dataclasses.replace(base, **as_config_values(params), **overrides)
    validate(cfg)
    return cfg


# --- the built-in space --------------------------------------------------------------------------

def size_choices(size: int, min_side: int = MIN_SIZE) -> tuple[int, ...]:
    """Half, three quarters and all of the run's side, in multiples of 8 where the side allows."""
    sides = []
    for share in (0.5, 0.75, 1.0):
        side = int(size * share)
        side = side - side % 8 if side >= 16 else side
        if side >= max(min_side, MIN_SIZE) and side not in sides:
            sides.append(side)
    return tuple(sides) or (size,)


def default_space(size: int, archs=DEFAULT_ARCHS) -> Space:
    """The built-in space for a data set whose run would train at ``size`` pixels.

    Learning rate and weight decay on log scales (numbers rather than ``auto``: the learning-rate
    finder would add a pass over the data to every trial); the loss and its parameters; the
    oversampling cap; the image side; the architecture from a short list; the frozen epochs of a
    pretrained model."""
    from ..models import min_size

    smallest = max((min_size(a) or MIN_SIZE for a in archs), default=MIN_SIZE)
    return Space((
        Param("lr", 1e-4, 1e-2, log=True),
        Param("wd", 1e-4, 1e-1, log=True),
        Param("loss", choices=("bce", "focal", "asl")),
        Param("focal_gamma", 0.5, 4.0),
        Param("asl_gamma_neg", 1.0, 6.0),
        Param("asl_clip", 0.0, 0.2),
        Param("oversample_cap", 1.0, 10.0),
        Param("size", choices=size_choices(size, smallest)),
        Param("arch", choices=tuple(archs)),
        Param("freeze_epochs", 0, 3),
    ))


# --- a space file ----------------------------------------------------------------------------------

def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def read_space(path) -> Space:
    """The space in the TOML file ``path``, every value checked as its flag is; one HPAError line
    naming the file and the field otherwise."""
    path = Path(path)
    where = f"--space {path}"
    try:
        # O_NONBLOCK: a FIFO put in the file's place is refused below instead of waited on
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise HPAError(f"{where}: cannot read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise HPAError(f"{where}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_SPACE_BYTES:
            raise HPAError(f"{where}: larger than {MAX_SPACE_BYTES // 1024} KiB; a space file is a few lines")
        raw = f.read(MAX_SPACE_BYTES + 1)
    try:
        text = raw.decode("utf-8")
        data = _toml().loads(text)
    except UnicodeDecodeError as e:
        raise HPAError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise HPAError(f"{where}: not valid TOML ({str(e).splitlines()[0][:160] if str(e) else 'nested too deeply'})") from None
    return space_from_dict(data, where)


def space_from_dict(data: dict, where: str = "the space") -> Space:
    """A space from ``{field: {"low", "high", "log", "step"} or {"choices"}}``, checked (see ``read_space``)."""
    if not isinstance(data, dict) or not data:
        raise HPAError(f"{where}: names no field; e.g. lr = {{ low = 1e-4, high = 1e-2, log = true }}")
    if len(data) > MAX_PARAMS:
        raise HPAError(f"{where}: {len(data)} fields, more than the {MAX_PARAMS} a space may have")
    return Space(tuple(check_param(name, spec, where) for name, spec in data.items()))


def check_param(name, spec, where: str) -> Param:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    label = f"{where}: {str(name)[:60]!r}"
    if name not in fields:
        close = [f for f in fields if f.replace("_", "") == str(name).replace("-", "").replace("_", "").lower()]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise HPAError(f"{label} is not a training flag{hint}; a space names TrainConfig fields such as lr, wd, loss, bs")
    if name in NOT_SEARCHED:
        raise HPAError(f"{label}: {flag(name)} cannot be searched (it sets {NOT_SEARCHED[name]}); give it as a flag")
    if not isinstance(spec, dict):
        raise HPAError(f"{label} must be a table: {{ low = ..., high = ... }} or {{ choices = [...] }} (got {spec!r:.60})")
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise HPAError(f"{label}: unknown key {unknown[0]!r:.40}; a field takes low, high, log, step or choices")
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise HPAError(f"{label}: give either choices or a range (low, high), not both")
        return _choices(name, spec["choices"], label)
    if "low" not in spec or "high" not in spec:
        raise HPAError(f"{label}: a range needs both low and high (or give choices = [...])")
    return _range(name, spec, label)


def _field_type(name: str):
    args = typing.get_args(typing.get_type_hints(TrainConfig)[name]) or (typing.get_type_hints(TrainConfig)[name],)
    return {a for a in args if a is not type(None)}


def _check_value(name: str, value, label: str) -> None:
    value = as_config_values({name: value})[name]
    try:
        check_field(TrainConfig, name, value)
    except HPAError as e:
        raise HPAError(f"{label}: {e}") from None
    if name == "arch":  # which architectures exist only the model registry knows
        from ..models import check_arch

        try:
            check_arch(value)
        except ValueError as e:
            raise HPAError(f"{label}: {flag(name)} {e}") from None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choices(name: str, choices, label: str) -> Param:
    if not isinstance(choices, list) or not choices:
        raise HPAError(f"{label}: choices must be a non-empty list (got {choices!r:.60})")
    if len(choices) > MAX_CHOICES:
        raise HPAError(f"{label}: {len(choices)} choices, more than {MAX_CHOICES}")
    if any(not isinstance(c, (bool, int, float, str)) for c in choices):
        raise HPAError(f"{label}: choices must be numbers, text or true/false (got {choices!r:.60})")
    if len(set(map(repr, choices))) < len(choices):
        raise HPAError(f"{label}: a choice is listed twice ({choices!r:.60})")
    if name in NUMBER_AS_TEXT:  # lr = { choices = ["auto", 1e-3] }: the flag's text
        choices = [repr(float(c)) if _number(c) else c for c in choices]
    for c in choices:
        if _number(c) and not math.isfinite(c):
            raise HPAError(f"{label}: {c} is not a finite number")
        _check_value(name, c, label)
    return Param(name, choices=tuple(choices))


def _range(name: str, spec: dict, label: str) -> Param:
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    types = _field_type(name)
    if not (types & {int, float} or name in NUMBER_AS_TEXT):
        raise HPAError(f"{label}: {flag(name)} is not a number; give its values as choices = [...]")
    for key, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _number(v) or not math.isfinite(v):
            raise HPAError(f"{label}: {key} must be a finite number (got {v!r:.40})")
    if not isinstance(log, bool):
        raise HPAError(f"{label}: log must be true or false (got {log!r:.40})")
    integer = types == {int}
    if integer:
        if not all(isinstance(v, int) for v in (low, high) + ((step,) if step is not None else ())):
            raise HPAError(f"{label}: {flag(name)} takes whole numbers; low, high and step must be integers "
                           f"(got {low!r:.20}, {high!r:.20})")
    else:
        low, high, step = float(low), float(high), (float(step) if step is not None else None)
    if not low < high:
        raise HPAError(f"{label}: the range {low:g} to {high:g} is empty (low must be below high); "
                       "for one value give it as a flag")
    if log and low <= 0:
        raise HPAError(f"{label}: a log range must lie above 0 (got low = {low:g}); use log = false, or a low above 0")
    if step is not None and (step <= 0 or log):
        raise HPAError(f"{label}: step must be positive and cannot go with log = true (got step = {step:g})")
    if step is not None and step > high - low:
        raise HPAError(f"{label}: step {step:g} is larger than the range {low:g} to {high:g}")
    probes = range(low, high + 1, step or 1) if integer and (high - low) // (step or 1) <= 1000 else (low, high)
    for v in probes:
        _check_value(name, v, label)
    return Param(name, low, high, log=log, step=step)

