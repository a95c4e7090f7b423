"""Label sets drawn with the real competitions' statistics (class imbalance, co-occurrence),
and the argument checks the data-set writer shares."""
from __future__ import annotations

import operator

import numpy as np

from ..errors import HPAError
from ..data.vocab import NAMES

# Label statistics, measured once on the competitions' own train.csv label files
# (Kaggle "Human Protein Atlas Image Classification" 2018: 31,072 images; "Zero to GANs -
# Human Protein Classification": 19,236 images). Only these numbers are kept here.
#   _FREQ:     fraction of images carrying each class.
#   _N_LABELS: fraction of images with 1, 2, 3, ... labels.
#   _PAIRS:    P(b in image | a in image), pairs under 1% left out.
#   _FIRST:    weights for an image's first label: _FREQ reweighted (by simulating
#              `sample_labels`) so that the sampled per-class frequencies match _FREQ;
#              without it, classes that are mostly reached through _PAIRS come out too often.
_HPA2018_FREQ = (.4147, .0404, .1165, .0502, .0598, .0809, .0324, .0908, .0017, .0014, .0009, .0352, .0221, .0173, .0343, .0007, .0171, .0068, .0290, .0477, .0055, .1216, .0258, .0954, .0104, .2648, .0106, .0004)
_HPA2018_N_LABELS = (.4868, .4018, .1017, .0096, .0001)
_HPA2018_FIRST = (.3762, .0330, .0958, .0567, .0792, .0899, .0466, .1003, .0030, .0013, .0003, .0458, .0230, .0189, .0422, .0011, .0111, .0076, .0338, .0511, .0092, .1125, .0269, .1202, .0149, .2165, .0167, .0007)
_HPA2018_PAIRS = {
    0: {1: .047, 2: .135, 3: .044, 5: .063, 7: .085, 11: .020, 12: .016, 13: .014, 14: .017, 16: .022, 18: .022, 19: .048, 21: .104, 22: .025, 23: .062, 25: .282},
    1: {0: .478, 2: .117, 3: .015, 4: .041, 5: .031, 6: .017, 7: .045, 11: .010, 13: .011, 19: .015, 21: .061, 23: .036, 25: .208},
    2: {0: .479, 1: .041, 4: .013, 5: .016, 6: .022, 7: .052, 11: .022, 14: .020, 16: .013, 19: .015, 21: .060, 22: .014, 23: .062, 25: .216},
    3: {0: .366, 1: .012, 4: .015, 6: .015, 7: .026, 14: .011, 19: .013, 21: .022, 22: .010, 23: .033, 25: .174},
    4: {0: .052, 1: .028, 2: .026, 3: .012, 7: .023, 12: .013, 14: .010, 21: .073, 22: .013, 23: .024, 25: .177},
    5: {0: .321, 1: .016, 2: .023, 7: .032, 11: .010, 14: .012, 19: .011, 21: .048, 23: .018, 24: .012, 25: .221},
    6: {0: .088, 1: .021, 2: .078, 3: .024, 5: .014, 7: .024, 9: .011, 10: .011, 21: .031, 25: .150},
    7: {0: .387, 1: .020, 2: .067, 3: .014, 4: .015, 5: .028, 16: .013, 21: .049, 22: .010, 25: .146},
    8: {0: .094, 2: .208, 3: .075, 7: .019, 21: .038, 25: .038},
    9: {6: .244, 10: .622},
    10: {6: .393, 9: 1.0},
    11: {0: .237, 1: .012, 2: .074, 3: .013, 4: .014, 5: .023, 19: .020, 21: .020, 24: .016, 25: .127},
    12: {0: .291, 1: .010, 2: .036, 4: .035, 5: .029, 7: .022, 13: .026, 14: .016, 19: .022, 21: .192, 23: .026, 25: .227, 26: .010},
    13: {0: .331, 1: .026, 2: .026, 3: .015, 4: .020, 5: .017, 7: .039, 11: .017, 12: .034, 18: .022, 19: .020, 21: .207, 22: .020, 25: .235},
    14: {0: .204, 2: .069, 3: .016, 4: .017, 5: .028, 7: .013, 12: .010, 16: .096, 17: .043, 19: .011, 21: .039, 25: .147},
    15: {0: .571, 2: .476, 5: .381, 16: .429},
    16: {0: .540, 2: .091, 4: .019, 5: .038, 6: .017, 7: .070, 14: .192, 15: .017, 17: .145, 18: .049, 19: .025, 21: .072, 22: .026, 23: .017, 24: .011, 25: .283},
    17: {0: .357, 2: .033, 5: .014, 7: .029, 14: .219, 16: .367, 18: .233, 19: .048, 21: .129, 23: .014, 25: .362},
    18: {0: .309, 1: .012, 2: .020, 4: .018, 5: .014, 7: .010, 13: .013, 16: .029, 17: .054, 21: .069, 22: .012, 23: .017, 24: .011, 25: .286},
    19: {0: .414, 1: .013, 2: .038, 3: .013, 4: .011, 5: .018, 7: .015, 11: .015, 12: .010, 21: .050, 23: .024, 25: .186},
    20: {0: .337, 2: .035, 4: .012, 6: .035, 23: .099, 25: .052},
    21: {0: .356, 1: .020, 2: .057, 4: .036, 5: .032, 7: .037, 12: .035, 13: .029, 14: .011, 16: .010, 18: .016, 19: .020, 22: .033, 23: .018, 25: .244},
    22: {0: .405, 2: .065, 3: .020, 4: .030, 5: .025, 7: .036, 11: .011, 13: .014, 16: .017, 18: .014, 19: .017, 21: .156, 23: .022, 25: .136},
    23: {0: .270, 1: .015, 2: .076, 3: .017, 4: .015, 5: .015, 19: .012, 21: .023, 25: .066},
    24: {0: .242, 2: .037, 4: .025, 5: .093, 7: .016, 11: .056, 16: .019, 18: .031, 21: .028, 22: .016, 23: .012, 25: .165},
    25: {0: .441, 1: .032, 2: .095, 3: .033, 4: .040, 5: .067, 6: .018, 7: .050, 11: .017, 12: .019, 13: .015, 14: .019, 16: .018, 18: .031, 19: .034, 21: .112, 22: .013, 23: .024},
    26: {0: .351, 2: .034, 3: .037, 4: .052, 5: .034, 12: .021, 21: .049, 25: .165},
    27: {0: .636, 2: .091, 4: .091, 5: .364, 19: .091, 23: .182},
}
_Z2G_FREQ = (.1085, .0911, .1321, .1028, .4713, .0577, .2969, .1367, .0539, .0664)
_Z2G_N_LABELS = (.5531, .3794, .0645, .0030)
_Z2G_FIRST = (.1286, .0994, .1183, .1066, .4682, .0644, .2608, .1310, .0543, .0859)
_Z2G_PAIRS = {
    0: {1: .017, 2: .075, 4: .271, 5: .016, 6: .070, 7: .026, 8: .012, 9: .015},
    1: {0: .020, 2: .027, 3: .030, 4: .321, 6: .220, 7: .045, 8: .010},
    2: {0: .062, 1: .019, 3: .048, 4: .482, 6: .207, 7: .054, 8: .013, 9: .013},
    3: {1: .027, 2: .062, 4: .383, 5: .013, 6: .147, 7: .051, 9: .017},
    4: {0: .062, 1: .062, 2: .135, 3: .083, 5: .044, 6: .281, 7: .107, 8: .049},
    5: {0: .030, 3: .023, 4: .358, 6: .172, 7: .022, 8: .011, 9: .014},
    6: {0: .026, 1: .067, 2: .092, 3: .051, 4: .447, 5: .033, 7: .109, 8: .033, 9: .038},
    7: {0: .021, 1: .030, 2: .052, 3: .038, 4: .368, 6: .237, 8: .022, 9: .035},
    8: {0: .025, 1: .017, 2: .032, 3: .016, 4: .430, 5: .012, 6: .184, 7: .056, 9: .010},
    9: {0: .025, 2: .026, 3: .026, 4: .049, 5: .012, 6: .171, 7: .073},
}

LABEL_FREQ = {"hpa2018": _HPA2018_FREQ, "z2g": _Z2G_FREQ}


def _pair_matrix(pairs: dict, k: int) -> np.ndarray:
    m = np.zeros((k, k))
    for a, row in pairs.items():
        for b, p in row.items():
            m[a, b] = p
    return m


_MODELS = {
    fmt: (np.asarray(freq), np.asarray(first), np.asarray(n_labels), _pair_matrix(pairs, len(freq)))
    for fmt, freq, first, n_labels, pairs in (
        ("hpa2018", _HPA2018_FREQ, _HPA2018_FIRST, _HPA2018_N_LABELS, _HPA2018_PAIRS),
        ("z2g", _Z2G_FREQ, _Z2G_FIRST, _Z2G_N_LABELS, _Z2G_PAIRS),
    )
}


def _check_fmt(fmt) -> None:
    if fmt not in NAMES:
        raise HPAError(f"fmt must be one of {', '.join(sorted(NAMES))}, not {fmt!r}")


def _as_int(value, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise HPAError(f"{name} must be an integer, got {value!r}") from None


def _pick(weights: np.ndarray, rng: np.random.Generator) -> int:
    # One uniform draw per pick keeps the stream short and the result reproducible.
    c = np.cumsum(weights)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(c) - 1))


def sample_labels(n: int, fmt: str, rng: np.random.Generator) -> list[list[int]]:
    """Draw label sets for ``n`` images with the real competition's statistics.

    Each image gets a label count, a first label, then further labels drawn from the
    pair statistics of the labels it already has. Labels come in drawing order (the
    real files are not sorted either); every set is non-empty.
    """
    _check_fmt(fmt)
    n = _as_int(n, "n")
    if n < 0:
        raise HPAError(f"n must be >= 0, got {n}")
    freq, first, n_labels, pairs = _MODELS[fmt]
    out = []
    for _ in range(n):
        k = _pick(n_labels, rng) + 1
        chosen = [_pick(first, rng)]
        while len(chosen) < k:
            w = pairs[chosen].sum(axis=0)
            w[chosen] = 0
            if w.sum() <= 0:
                w = freq.copy()
                w[chosen] = 0
            chosen.append(_pick(w, rng))
        out.append(chosen)
    return out
