"""Synthetic Human Protein Atlas data: fields of cells whose green stain follows the labels.

Used to try the whole pipeline without the real competition downloads. `make_dataset`
writes either competition's exact folder layout; labels are drawn with the real
label statistics, so class imbalance and co-occurrence look like the real thing.
"""
from __future__ import annotations

import io
import operator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ._io import save_png, write_csv
from .errors import HPAError
from .vocab import NAMES

CHANNELS = ("red", "green", "blue", "yellow")

# ---------------------------------------------------------------------------------------
# Label statistics, measured once on the competitions' own train.csv label files
# (Kaggle "Human Protein Atlas Image Classification" 2018: 31,072 images; "Zero to GANs -
# Human Protein Classification": 19,236 images). Only these numbers are kept here.
#   _FREQ:     fraction of images carrying each class.
#   _N_LABELS: fraction of images with 1, 2, 3, ... labels.
#   _PAIRS:    P(b in image | a in image), pairs under 1% left out.
#   _FIRST:    weights for an image's first label: _FREQ reweighted (by simulating
#              `sample_labels`) so that the sampled per-class frequencies match _FREQ;
#              without it, classes that are mostly reached through _PAIRS come out too often.
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# Drawing. Every field is built on the full pixel grid with numpy; per-cell work is done
# inside each cell's bounding box, and spots are stamped with one bincount per call.
# ---------------------------------------------------------------------------------------


def _ellipse_rho(dy, dx, a, b, theta, amps, phases):
    """Normalised radius of an irregular ellipse: < 1 inside, 1 on the outline."""
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / a
    v = (dy * c - dx * s) / b
    r = np.sqrt(u * u + v * v) + 1e-6
    cu, sv = u / r, v / r
    # cos/sin of 2 and 3 times the polar angle without calling arctan2 on the grid.
    c2, s2 = cu * cu - sv * sv, 2 * cu * sv
    c3, s3 = cu * c2 - sv * s2, sv * c2 + cu * s2
    wobble = (1 + amps[0] * (c2 * np.cos(phases[0]) - s2 * np.sin(phases[0]))
              + amps[1] * (c3 * np.cos(phases[1]) - s3 * np.sin(phases[1])))
    return r / wobble


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(2.5 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float32)
    g = np.exp(-(t * t) / (2 * sigma * sigma))
    return np.outer(g, g).astype(np.float32)


def _ring_kernel(radius: float, width: float) -> np.ndarray:
    r = int(np.ceil(radius + 2.5 * width))
    t = np.arange(-r, r + 1, dtype=np.float32)
    d = np.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    return np.exp(-((d - radius) / width) ** 2).astype(np.float32)


def _rod_kernel(length: float, width: float, angle: float) -> np.ndarray:
    r = int(np.ceil(length / 2 + 2.5 * width))
    t = np.arange(-r, r + 1, dtype=np.float32)
    y, x = t[:, None], t[None, :]
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    excess = np.maximum(np.abs(along) - length / 2, 0)
    return np.exp(-(excess ** 2 + across ** 2) / (2 * width * width)).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur over the first two axes, edges replicated."""
    r = int(np.ceil(2.5 * sigma))
    if r < 1:
        return img
    t = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-(t * t) / (2 * sigma * sigma))
    k /= k.sum()
    h, w = img.shape[:2]
    for axis, n in ((0, h), (1, w)):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")
        sl = [slice(None)] * img.ndim
        sl[axis] = slice(0, n)
        out = k[0] * p[tuple(sl)]
        for j in range(1, 2 * r + 1):
            sl[axis] = slice(j, j + n)
            out += k[j] * p[tuple(sl)]
        img = out
    return img


class _Field:
    """Cell geometry of one image plus the helpers the stain patterns draw with."""

    def __init__(self, size: int, rng: np.random.Generator, easy: bool):
        self.size, self.rng, self.easy = size, rng, easy
        self.big = 1.5 if easy else 1.0  # easy data: larger structures
        S = size
        n_max = int(np.clip(round(3 + 5 * size / 512), 3, 8))
        n = int(rng.integers(3, (4 if easy else n_max) + 1))
        g = int(np.ceil(np.sqrt(n)))
        spacing = S / g
        slots = rng.permutation(g * g)[:n]
        self.yy = np.arange(S, dtype=np.float32)[:, None]
        self.xx = np.arange(S, dtype=np.float32)[None, :]

        rho1 = np.full((S, S), 9.0, np.float32)
        rho2 = np.full((S, S), 9.0, np.float32)
        owner = np.full((S, S), -1, np.int8)
        cells = []
        for i, slot in enumerate(slots):
            cy = (slot // g + 0.5 + rng.uniform(-0.2, 0.2)) * spacing
            cx = (slot % g + 0.5 + rng.uniform(-0.2, 0.2)) * spacing
            # Large enough that most neighbours touch, as in a confluent culture.
            a = 0.62 * spacing * rng.uniform(0.9, 1.25)
            b = a * rng.uniform(0.7, 0.95)
            th = rng.uniform(0, np.pi)
            amps, phases = rng.uniform(0, 0.08, 2), rng.uniform(0, 2 * np.pi, 2)
            box = self._box(cy, cx, 1.25 * a)
            if box is None:
                continue
            (y0, y1, x0, x1) = box
            rho = _ellipse_rho(self.yy[y0:y1] - cy, self.xx[:, x0:x1] - cx, a, b, th, amps, phases)
            r1, r2, ow = rho1[y0:y1, x0:x1], rho2[y0:y1, x0:x1], owner[y0:y1, x0:x1]
            better = rho < r1
            # Voronoi on normalised radius: neighbours meet along a shared boundary, and
            # rho2 - rho1 stays small near that boundary (cell-cell contacts).
            r2[...] = np.where(better, r1, np.minimum(r2, rho))
            r1[...] = np.where(better, rho, r1)
            ow[better] = len(cells)
            cells.append(dict(cy=cy, cx=cx, a=a, b=b, th=th, box=box, R=float(np.sqrt(a * b))))
        owner[rho1 >= 1] = -1

        rho_n = np.full((S, S), 9.0, np.float32)
        dyn = np.zeros((S, S), np.float32)
        dxn = np.zeros((S, S), np.float32)
        for i, c in enumerate(cells):
            ct, st = np.cos(c["th"]), np.sin(c["th"])
            oy, ox = rng.uniform(-0.12, 0.12, 2)
            c["ny"] = c["cy"] + ox * c["a"] * st + oy * c["b"] * ct
            c["nx"] = c["cx"] + ox * c["a"] * ct - oy * c["b"] * st
            c["na"] = c["a"] * rng.uniform(0.38, 0.48)
            c["nb"] = c["b"] * rng.uniform(0.45, 0.6)
            c["nth"] = c["th"] + rng.uniform(-0.3, 0.3)
            c["rn"] = float(np.sqrt(c["na"] * c["nb"]))
            y0, y1, x0, x1 = c["box"]
            dy, dx = self.yy[y0:y1] - c["ny"], self.xx[:, x0:x1] - c["nx"]
            rn = _ellipse_rho(dy, dx, c["na"], c["nb"], c["nth"],
                              rng.uniform(0, 0.05, 2), rng.uniform(0, 2 * np.pi, 2))
            mine = owner[y0:y1, x0:x1] == i
            rho_n[y0:y1, x0:x1][mine] = rn[mine]
            dyn[y0:y1, x0:x1][mine] = np.broadcast_to(dy, mine.shape)[mine]
            dxn[y0:y1, x0:x1][mine] = np.broadcast_to(dx, mine.shape)[mine]
            # Nucleoli positions are part of the cell, whatever the labels: the fibrillar
            # centre pattern and the blue channel both refer to them.
            c["nucleoli"] = self.nuc_points(c, int(rng.integers(2, 5)), 0.55)

        self.cells = cells
        self.n = len(cells)
        self.owner = owner
        self.cell = owner >= 0
        self.rho = np.where(self.cell, rho1, 9.0).astype(np.float32)
        self.contact = np.where(self.cell & (rho2 < 1.1), rho2 - rho1, 9.0).astype(np.float32)
        self.rho_n = rho_n
        self.dyn, self.dxn = dyn, dxn
        self.dist_n = np.sqrt(dyn * dyn + dxn * dxn) + 1e-3
        self.R_px = self.lookup([c["R"] for c in cells], bg=S / 4)
        self.rn_px = self.lookup([c["rn"] for c in cells], bg=S / 8)
        self.nuc = self.cell & (rho_n < 1)
        self.cyto = self.cell & ~self.nuc
        # Soft nucleus mask, ~1.5 px rim.
        self.nuc_soft = np.clip((1 - rho_n) * self.rn_px / 1.5, 0, 1)
        self.peri = np.exp(-np.maximum(rho_n - 1, 0) * 0.9)  # falls off away from the nucleus
        self.fibres = self._fibres()
        self.er = self._er()

    # --- geometry helpers --------------------------------------------------------------
    def _box(self, cy, cx, ext):
        S = self.size
        y0, y1 = max(0, int(cy - ext)), min(S, int(cy + ext) + 2)
        x0, x1 = max(0, int(cx - ext)), min(S, int(cx + ext) + 2)
        return None if y0 >= y1 or x0 >= x1 else (y0, y1, x0, x1)

    def lookup(self, per_cell, bg=0.0) -> np.ndarray:
        """Per-pixel map of a per-cell value (owner -1 indexes the background entry)."""
        table = np.asarray(list(per_cell) + [bg], dtype=np.float32)
        return table[self.owner]

    def gain(self, lo=0.45) -> np.ndarray:
        """Per-pixel map of a fresh per-cell brightness."""
        lo = max(lo, 0.85) if self.easy else lo
        return self.lookup(self.rng.uniform(lo, 1.0, self.n), bg=0.8)

    def noise(self, scale: float) -> np.ndarray:
        """Smooth gaussian noise, correlation length ~scale px, std ~1."""
        S = self.size
        m = max(2, int(np.ceil(S / max(scale, 1.0))) + 1)
        low = self.rng.standard_normal((m, m)).astype(np.float32)
        a = np.asarray(Image.fromarray(low).resize((S, S), Image.BICUBIC))
        return a / (a[::4, ::4].std() + 1e-6)

    def ridges(self, scale: float, width: float) -> np.ndarray:
        """Thin network of lines along the zero crossings of smooth noise."""
        n = self.noise(scale)
        return np.exp(-(n / width) ** 2)

    def nuc_points(self, c, k, rmax):
        rng = self.rng
        t = np.sqrt(rng.random(k)) * rmax
        phi = rng.uniform(0, 2 * np.pi, k)
        u, v = c["na"] * t * np.cos(phi), c["nb"] * t * np.sin(phi)
        ct, st = np.cos(c["nth"]), np.sin(c["nth"])
        return c["ny"] + u * st + v * ct, c["nx"] + u * ct - v * st

    def peri_points(self, i, k, lo, hi, spread=np.pi):
        """k points at lo..hi nucleus radii from cell i's nucleus, around one direction."""
        c, rng = self.cells[i], self.rng
        psi = rng.uniform(0, 2 * np.pi)
        phi = psi + rng.uniform(-spread, spread, k)
        t = rng.uniform(lo, hi, k) * c["rn"]
        ys, xs = c["ny"] + t * np.sin(phi), c["nx"] + t * np.cos(phi)
        return self._keep_in(ys, xs, i)

    def _keep_in(self, ys, xs, i):
        iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
        ok = (iy >= 0) & (iy < self.size) & (ix >= 0) & (ix < self.size)
        ok[ok] = self.owner[iy[ok], ix[ok]] == i
        return ys[ok], xs[ok]

    def points_in(self, mask, per_cell):
        """About per_cell points per cell, uniform over mask."""
        idx = np.flatnonzero(mask)
        k = int(round(per_cell * self.n))
        if idx.size == 0 or k == 0:
            return np.zeros(0), np.zeros(0)
        pick = idx[self.rng.integers(0, idx.size, k)]
        return (pick // self.size).astype(float), (pick % self.size).astype(float)

    def sig(self, px: float) -> float:
        return max(0.6, px) * self.big

    def stamp(self, img, ys, xs, kernel, amps=1.0):
        if len(ys) == 0:
            return img
        S, h = self.size, kernel.shape[0] // 2
        iy, ix = np.rint(ys).astype(np.intp), np.rint(xs).astype(np.intp)
        o = np.arange(-h, h + 1)
        Y = iy[:, None, None] + o[None, :, None]
        X = ix[:, None, None] + o[None, None, :]
        ok = (Y >= 0) & (Y < S) & (X >= 0) & (X < S)
        amps = np.broadcast_to(np.asarray(amps, np.float32), (len(ys),))
        vals = (amps[:, None, None] * kernel[None])
        acc = np.bincount((Y * S + X)[ok], weights=vals[ok], minlength=S * S)
        img += acc.reshape(S, S).astype(np.float32)
        return img

    def segment(self, img, p0, p1, width, amp=1.0):
        """Add a straight line of gaussian profile from p0 to p1 (y, x)."""
        (y0, x0), (y1, x1) = p0, p1
        m = 3 * width + 1
        box = (max(0, int(min(y0, y1) - m)), min(self.size, int(max(y0, y1) + m) + 1),
               max(0, int(min(x0, x1) - m)), min(self.size, int(max(x0, x1) + m) + 1))
        if box[0] >= box[1] or box[2] >= box[3]:
            return img
        yy, xx = self.yy[box[0]:box[1]], self.xx[:, box[2]:box[3]]
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        d2 = (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2
        img[box[0]:box[1], box[2]:box[3]] += amp * np.exp(-d2 / (width * width))
        return img

    # --- reference stains ---------------------------------------------------------------
    def _fibres(self) -> np.ndarray:
        """Microtubule-like fibres radiating from each nucleus."""
        rng, S = self.rng, self.size
        # Integer angular frequency so fibres join up across the +-pi seam.
        spacing = [max(3.0, c["R"] / 12) for c in self.cells]
        K = self.lookup([round(2 * np.pi * c["R"] / s) for c, s in zip(self.cells, spacing)])
        twist = self.lookup(rng.uniform(-1.5, 1.5, self.n))
        ang = np.arctan2(self.dyn, self.dxn)
        wav = self.noise(S / 8) * 1.5
        f = 0.5 + 0.5 * np.cos(K * ang + twist * self.dist_n / self.R_px + wav)
        f = f * f
        f = f * f
        # Fibres converge towards the nucleus centre; blend to a flat level there instead
        # of drawing an aliased star.
        c = np.clip((self.dist_n / self.rn_px - 0.5) / 0.7, 0, 1)
        f = (1 - c) * 0.35 + c * f
        return f * np.clip(0.55 + 0.3 * self.noise(S / 10), 0, 1) * self.cell

    def _er(self) -> np.ndarray:
        """Reticular network, diffuse haze, densest around the nucleus."""
        Rm = float(np.mean([c["R"] for c in self.cells])) if self.cells else self.size / 4
        net = self.ridges(max(2.5, Rm / 5) * self.big, 0.3)
        er = (0.3 + 0.7 * net) * self.peri
        return er * np.where(self.nuc, 0.15, 1.0) * self.cell


# --- green patterns, one per class name -----------------------------------------------
# Each returns a float32 map with structures at ~1 where the protein sits.


def _nucleoplasm(f):
    return f.nuc_soft * np.clip(0.8 + 0.15 * f.noise(f.size / 12), 0, 1)


def _nuclear_membrane(f):
    w = 1.2 * f.big / f.rn_px + 0.04
    return np.exp(-((f.rho_n - 0.95) / w) ** 2) * f.cell


def _nucleoli_blobs(f, amp=1.0, img=None):
    img = np.zeros((f.size, f.size), np.float32) if img is None else img
    for c in f.cells:
        ys, xs = c["nucleoli"]
        f.stamp(img, ys, xs, _gauss_kernel(f.sig(0.16 * c["rn"])), amp)
    return img


def _nucleoli(f):
    return _nucleoli_blobs(f)


def _fibrillar_center(f):
    img = _nucleoli_blobs(f, 0.12)
    for c in f.cells:
        ys, xs = c["nucleoli"]
        k = f.rng.integers(1, 4, len(ys))
        ys, xs = np.repeat(ys, k), np.repeat(xs, k)
        off = 0.08 * c["rn"]
        ys = ys + f.rng.uniform(-off, off, len(ys))
        xs = xs + f.rng.uniform(-off, off, len(xs))
        f.stamp(img, ys, xs, _gauss_kernel(f.sig(0.04 * c["rn"])))
    return img


def _nuclear_spots(f, lo, hi, rmax, sigma, amp_lo):
    img = np.zeros((f.size, f.size), np.float32)
    for c in f.cells:
        k = int(f.rng.integers(lo, hi + 1))
        ys, xs = f.nuc_points(c, k, rmax)
        f.stamp(img, ys, xs, _gauss_kernel(f.sig(sigma * c["rn"])), f.rng.uniform(amp_lo, 1, k))
    return img


def _nuclear_speckles(f):
    return _nuclear_spots(f, 12, 25, 0.8, 0.06, 0.5) + 0.15 * f.nuc_soft


def _nuclear_bodies(f):
    return _nuclear_spots(f, 1, 6, 0.75, 0.05, 0.9)


def _er(f):
    return f.er


def _golgi(f):
    psi = f.rng.uniform(0, 2 * np.pi, f.n)
    cosd = (f.dxn * f.lookup(np.cos(psi)) + f.dyn * f.lookup(np.sin(psi))) / f.dist_n
    arc = np.exp(3.0 * (cosd - 1))
    band = np.exp(-((f.rho_n - 1.3) / 0.3) ** 2)
    tex = np.clip(0.6 + 0.4 * f.noise(2.5 * f.big), 0, 1)
    return arc * band * tex * f.cyto


def _cyto_spots(f, per_cell, sigma, amp_lo, mask=None):
    img = np.zeros((f.size, f.size), np.float32)
    ys, xs = f.points_in(f.cyto if mask is None else mask, per_cell)
    Rm = np.mean([c["R"] for c in f.cells])
    return f.stamp(img, ys, xs, _gauss_kernel(f.sig(sigma * Rm)), f.rng.uniform(amp_lo, 1, len(ys)))


def _peroxisomes(f):
    return _cyto_spots(f, 40, 0.035, 0.5)


def _endosomes(f):
    return _cyto_spots(f, 15, 0.06, 0.4)


def _lysosomes(f):
    return _cyto_spots(f, 15, 0.055, 0.4, f.cyto & (f.rho_n < 1.8))


def _cytoplasmic_bodies(f):
    return _cyto_spots(f, 2, 0.1, 0.8)


def _intermediate_filaments(f):
    Rm = np.mean([c["R"] for c in f.cells])
    return f.ridges(Rm / 2.5, 0.12) * np.exp(-np.maximum(f.rho_n - 1, 0) * 0.6) * f.cyto


def _actin(f):
    rng = f.rng
    al = rng.uniform(0, np.pi, f.n)
    period = f.lookup([max(3.0, c["R"] / 6) * f.big for c in f.cells], bg=4.0)
    u = f.xx * f.lookup(np.cos(al)) + f.yy * f.lookup(np.sin(al))
    stripes = (0.5 + 0.5 * np.cos(2 * np.pi * u / period + f.lookup(rng.uniform(0, 6.3, f.n)))) ** 6
    w = 1.5 * f.big / f.R_px
    cortex = np.exp(-((1 - f.rho) / w) ** 2)
    return (stripes * (0.2 + 0.8 * f.rho ** 2) + 0.8 * cortex) * f.cell


def _focal_adhesions(f):
    img = np.zeros((f.size, f.size), np.float32)
    ys, xs = f.points_in(f.cell & (f.rho > 0.8) & (f.rho < 0.95) & (f.contact > 0.15), 10)
    if len(ys) == 0:
        return img
    cy = np.array([c["cy"] for c in f.cells] + [0.0])[f.owner[ys.astype(int), xs.astype(int)]]
    cx = np.array([c["cx"] for c in f.cells] + [0.0])[f.owner[ys.astype(int), xs.astype(int)]]
    d = np.hypot(ys - cy, xs - cx) + 1e-6
    s = f.sig(0.03 * np.mean([c["R"] for c in f.cells]))
    amps = f.rng.uniform(0.6, 1, len(ys))
    # Short radial dashes, as focal adhesions sit at the ends of stress fibres.
    for step in (-1.2, 0.0, 1.2):
        f.stamp(img, ys + step * s * (ys - cy) / d, xs + step * s * (xs - cx) / d, _gauss_kernel(s), amps)
    return img


def _microtubules(f):
    return f.fibres


def _microtubule_ends(f):
    return _cyto_spots(f, 25, 0.0, 0.4, f.cyto & (f.rho > 0.55) & (f.rho < 0.95)) + 0.15 * f.fibres


def _cytokinetic_bridge(f):
    img = np.zeros((f.size, f.size), np.float32)
    if f.n < 2:
        return img
    ny = np.array([c["ny"] for c in f.cells])
    nx = np.array([c["nx"] for c in f.cells])
    d = np.hypot(ny[:, None] - ny[None], nx[:, None] - nx[None]) + np.eye(f.n) * 1e9
    n_bridges = 2 if f.n >= 6 and f.rng.random() < 0.5 else 1
    for _ in range(n_bridges):
        i, j = np.unravel_index(np.argmin(d), d.shape)
        d[i, j] = d[j, i] = 1e9
        ci, cj = f.cells[i], f.cells[j]
        # From nucleus edge to nucleus edge, with the bright midbody halfway.
        vy, vx = cj["ny"] - ci["ny"], cj["nx"] - ci["nx"]
        L = np.hypot(vy, vx) + 1e-6
        p0 = (ci["ny"] + vy / L * ci["rn"], ci["nx"] + vx / L * ci["rn"])
        p1 = (cj["ny"] - vy / L * cj["rn"], cj["nx"] - vx / L * cj["rn"])
        w = f.sig(0.03 * ci["R"])
        f.segment(img, p0, p1, w, 0.7)
        mid = ((p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2)
        f.stamp(img, [mid[0]], [mid[1]], _gauss_kernel(1.5 * w), 1.0)
    return img


def _mitotic_spindle(f):
    img = np.zeros((f.size, f.size), np.float32)
    k = 2 if f.n >= 6 else 1
    for i in f.rng.permutation(f.n)[:k]:
        c = f.cells[i]
        L, wmax = 0.8 * c["rn"], max(1.0, 0.35 * c["rn"])
        box = f._box(c["ny"], c["nx"], L + 3)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        al = f.rng.uniform(0, np.pi)
        dy, dx = f.yy[y0:y1] - c["ny"], f.xx[:, x0:x1] - c["nx"]
        t = dx * np.cos(al) + dy * np.sin(al)
        s = -dx * np.sin(al) + dy * np.cos(al)
        width = wmax * np.clip(1 - (t / L) ** 2, 0.05, 1)
        body = np.exp(-(s / width) ** 2) * (np.abs(t) < L)
        fib = 0.5 + 0.5 * np.cos(np.pi * 3 * s / width) ** 2
        img[y0:y1, x0:x1] += body * fib
        poles_y = [c["ny"] + L * np.sin(al), c["ny"] - L * np.sin(al)]
        poles_x = [c["nx"] + L * np.cos(al), c["nx"] - L * np.cos(al)]
        f.stamp(img, poles_y, poles_x, _gauss_kernel(f.sig(0.1 * c["rn"])), 1.0)
    return img


def _centrosome_like(f, dots, sigma, glow):
    img = np.zeros((f.size, f.size), np.float32)
    halo = np.zeros((f.size, f.size), np.float32)
    for i, c in enumerate(f.cells):
        ys, xs = f.peri_points(i, dots, 1.1, 1.35, spread=0.15)
        f.stamp(img, ys, xs, _gauss_kernel(f.sig(sigma * c["rn"])), 1.0)
        if glow:
            f.stamp(halo, ys[:1], xs[:1], _gauss_kernel(0.3 * c["R"]), 1.0)
    return img + glow * halo * (0.3 + f.fibres)


def _centrosome(f):
    return _centrosome_like(f, int(f.rng.integers(1, 3)), 0.05, 0.0)


def _mtoc(f):
    return _centrosome_like(f, 1, 0.12, 0.5)


def _lipid_droplets(f):
    img = np.zeros((f.size, f.size), np.float32)
    Rm = np.mean([c["R"] for c in f.cells])
    ys, xs = f.points_in(f.cyto, 5)
    kern = _ring_kernel(max(1.5, 0.07 * Rm) * f.big, f.sig(0.015 * Rm))
    return f.stamp(img, ys, xs, kern, f.rng.uniform(0.6, 1, len(ys)))


def _rods_rings(f):
    img = np.zeros((f.size, f.size), np.float32)
    Rm = np.mean([c["R"] for c in f.cells])
    ys, xs = f.points_in(f.cyto, 2.5)
    w = f.sig(0.015 * Rm)
    for y, x in zip(ys, xs):
        if f.rng.random() < 0.5:
            kern = _ring_kernel(max(1.5, 0.06 * Rm) * f.big, w)
        else:
            kern = _rod_kernel(max(3.0, 0.25 * Rm) * f.big, w, f.rng.uniform(0, np.pi))
        f.stamp(img, [y], [x], kern, 1.0)
    return img


def _plasma_membrane(f):
    w = 1.2 * f.big / f.R_px
    edge = np.exp(-((1 - f.rho) / w) ** 2)
    junction = np.exp(-(f.contact / w) ** 2)
    return np.maximum(edge, junction) * f.cell


def _cell_junctions(f):
    w = 2.0 * f.big / f.R_px
    dots = np.clip(0.5 + 0.5 * f.noise(2.5 * f.big), 0, 1)
    return np.exp(-(f.contact / w) ** 2) * dots * f.cell


def _mitochondria(f):
    Rm = np.mean([c["R"] for c in f.cells])
    threads = f.ridges(max(2.0, Rm / 7) * f.big, 0.25)
    broken = f.noise(max(2.0, Rm / 5)) > -0.2
    return threads * broken * f.peri * f.cyto


def _aggresome(f):
    img = np.zeros((f.size, f.size), np.float32)
    keep = f.rng.random(f.n) < 0.7
    keep[f.rng.integers(f.n)] = True
    for i, c in enumerate(f.cells):
        if keep[i]:
            ys, xs = f.peri_points(i, 1, 1.25, 1.45)
            f.stamp(img, ys, xs, _gauss_kernel(f.sig(0.22 * c["rn"])), 1.0)
    return img


def _cytosol(f):
    soft_edge = np.clip((1 - f.rho) * f.R_px / 1.5, 0, 1)
    return (f.cyto * soft_edge * (1 - 0.3 * f.rho) * np.clip(0.85 + 0.15 * f.noise(f.size / 10), 0, 1.2))


PATTERNS = {
    "Nucleoplasm": _nucleoplasm,
    "Nuclear membrane": _nuclear_membrane,
    "Nucleoli": _nucleoli,
    "Nucleoli fibrillar center": _fibrillar_center,
    "Nuclear speckles": _nuclear_speckles,
    "Nuclear bodies": _nuclear_bodies,
    "Endoplasmic reticulum": _er,
    "Golgi apparatus": _golgi,
    "Peroxisomes": _peroxisomes,
    "Endosomes": _endosomes,
    "Lysosomes": _lysosomes,
    "Intermediate filaments": _intermediate_filaments,
    "Actin filaments": _actin,
    "Focal adhesion sites": _focal_adhesions,
    "Microtubules": _microtubules,
    "Microtubule ends": _microtubule_ends,
    "Cytokinetic bridge": _cytokinetic_bridge,
    "Mitotic spindle": _mitotic_spindle,
    "Microtubule organizing center": _mtoc,
    "Centrosome": _centrosome,
    "Lipid droplets": _lipid_droplets,
    "Plasma membrane": _plasma_membrane,
    "Cell junctions": _cell_junctions,
    "Mitochondria": _mitochondria,
    "Aggresome": _aggresome,
    "Cytosol": _cytosol,
    "Cytoplasmic bodies": _cytoplasmic_bodies,
    "Rods & rings": _rods_rings,
}


def _as_int(value, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise HPAError(f"{name} must be an integer, got {value!r}") from None


def draw_field(labels: list[int], fmt: str, size: int, rng: np.random.Generator,
               easy: bool = False) -> np.ndarray:
    """One synthetic microscopy field, uint8 (size, size, 4) in CHANNELS order.

    Blue: nuclei; red: microtubules; yellow: ER; green: the protein, laid out by the
    class pattern of every label (superimposed). Per-image and per-cell brightness,
    blur and noise vary so that the pattern, not the colour or total intensity, tells
    the classes apart. ``easy`` gives stronger green, less noise and larger structures.
    """
    _check_fmt(fmt)
    size = _as_int(size, "size")
    if size < 16:
        raise HPAError(f"size must be >= 16 px, got {size}")
    names = NAMES[fmt]
    labels = [_as_int(x, "label") for x in labels]
    bad = [x for x in labels if not 0 <= x < len(names)]
    if bad:
        raise HPAError(f"label {bad[0]} is not a {fmt} class (0..{len(names) - 1})")

    f = _Field(size, rng, easy)
    S = size
    nucleoli = _nucleoli_blobs(f)

    blue = f.nuc_soft * f.gain(0.6) * np.clip(0.85 + 0.15 * f.noise(S / 16), 0, 1.2)
    blue = blue * (1 - 0.35 * np.minimum(nucleoli, 1))  # nucleoli are dim in DNA stains
    red = (0.25 + 0.75 * f.fibres) * (1 - 0.4 * np.minimum(f.rho, 1)) * f.gain(0.6)
    red = red * np.where(f.nuc, 0.35, 1.0) * f.cell
    yellow = f.er * f.gain(0.6)

    green = np.zeros((S, S), np.float32)
    for lab in dict.fromkeys(labels):
        weight = rng.uniform(0.85, 1.0) if easy else rng.uniform(0.6, 1.0)
        green += weight * PATTERNS[names[lab]](f) * f.gain()
    peak = float(green.max())
    if peak > 0:
        green /= peak
    if easy:
        green_gain, green_bg = rng.uniform(0.85, 1.0), 0.02
    else:
        green_gain, green_bg = rng.uniform(0.35, 1.0), rng.uniform(0.02, 0.08)
    # Weak nonspecific staining everywhere in the cells, as in real antibody images.
    green = green * green_gain + green_bg * f.cell

    stack = np.stack([red * rng.uniform(0.45, 0.9), green, blue * rng.uniform(0.6, 1.0),
                      yellow * rng.uniform(0.45, 0.9)], axis=-1).astype(np.float32)
    stack += rng.uniform(0.005, 0.03, 4).astype(np.float32)  # camera offset
    sigma = float(np.clip(S / 512, 0.5, 1.0) * rng.uniform(0.8, 1.2)) * (0.7 if easy else 1.0)
    stack = _blur(stack, sigma)
    read, shot = (0.008, 0.02) if easy else (rng.uniform(0.01, 0.03), rng.uniform(0.03, 0.06))
    noise = rng.standard_normal(stack.shape, dtype=np.float32)
    stack += noise * (read + shot * np.sqrt(np.maximum(stack, 0)))
    return np.clip(stack * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Data set layout.
# ---------------------------------------------------------------------------------------


def _hpa_ids(k: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < k:
        h = rng.bytes(14).hex()
        s = f"{h[:8]}-{h[8:12]}-11e8-{h[12:16]}-{h[16:28]}"
        if s not in seen:
            seen.add(s)
            ids.append(s)
    return ids


def _near_duplicate(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy that a pixel-exact comparison misses: rescaled, re-encoded or shifted."""
    S = arr.shape[0]
    kind = int(rng.integers(3))
    if kind == 0:
        small = max(8, int(S * rng.uniform(0.5, 0.8)))
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]))
                            .resize((small, small), Image.BILINEAR).resize((S, S), Image.BILINEAR))
                 for c in range(arr.shape[2])]
        return np.stack(chans, axis=-1)
    if kind == 1:
        q = int(rng.integers(75, 93))
        chans = []
        for c in range(arr.shape[2]):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr[..., c])).save(buf, format="JPEG", quality=q)
            buf.seek(0)
            chans.append(np.asarray(Image.open(buf).convert("L")))
        return np.stack(chans, axis=-1)
    dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, 2))
    p = np.pad(arr, ((3, 3), (3, 3), (0, 0)), mode="edge")
    return p[3 + dy:3 + dy + S, 3 + dx:3 + dx + S].copy()


def _write_image(folder: Path, image_id, arr: np.ndarray, fmt: str) -> None:
    if fmt == "z2g":
        save_png(folder / f"{image_id}.png", Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    else:
        for c, name in enumerate(CHANNELS):
            save_png(folder / f"{image_id}_{name}.png", Image.fromarray(np.ascontiguousarray(arr[..., c])))


def make_dataset(out_dir, fmt: str = "z2g", n_train: int = 200, n_test: int = 40, size: int = 512,
                 seed: int = 0, easy: bool = False, progress=None, plant_duplicates: int = 0) -> Path:
    """Write a synthetic data set in the competition's own layout and return its folder.

    fmt "z2g": train.csv (Image,Label), train/{Image}.png RGB, test/{Image}.png,
    submission.csv (Image,Label). fmt "hpa2018": train.csv (Id,Target), train/ and test/
    with {Id}_{red,green,blue,yellow}.png grayscale, sample_submission.csv (Id,Predicted).
    ``plant_duplicates`` adds that many near-duplicate train images (new id, same labels)
    and lists them in duplicates.csv (Id,duplicate_of). Same seed, same bytes.
    ``progress(done, total)`` is called after each image.
    """
    _check_fmt(fmt)
    n_train, n_test = _as_int(n_train, "n_train"), _as_int(n_test, "n_test")
    size, seed = _as_int(size, "size"), _as_int(seed, "seed")
    n_dup = _as_int(plant_duplicates, "plant_duplicates")
    if size < 16:
        raise HPAError(f"size must be >= 16 px, got {size}")
    if n_train < 1:
        raise HPAError(f"n_train must be >= 1, got {n_train}")
    if n_test < 0:
        raise HPAError(f"n_test must be >= 0, got {n_test}")
    if seed < 0:
        raise HPAError(f"seed must be >= 0, got {seed}")
    if n_dup < 0:
        raise HPAError(f"plant_duplicates must be >= 0, got {n_dup}")

    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    total = n_train + n_dup + n_test
    if fmt == "z2g":
        ids = [int(i) for i in rng.choice(max(100_000, 2 * total), size=total, replace=False)]
    else:
        ids = _hpa_ids(total, rng)
    train_ids, dup_ids, test_ids = ids[:n_train], ids[n_train:n_train + n_dup], ids[n_train + n_dup:]
    train_labels = sample_labels(n_train, fmt, rng)
    test_labels = sample_labels(n_test, fmt, rng)
    sources = rng.choice(n_train, size=n_dup, replace=n_dup > n_train) if n_dup else []
    dups_of: dict[int, list[int]] = {}
    for d, s in enumerate(sources):
        dups_of.setdefault(int(s), []).append(d)

    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # Each image has its own stream, so one image does not depend on how many came before.
    rows, dup_rows = [], []
    for i, (image_id, labels) in enumerate(zip(train_ids, train_labels)):
        img_rng = np.random.default_rng([seed, 1, i])
        arr = draw_field(labels, fmt, size, img_rng, easy)
        _write_image(out / "train", image_id, arr, fmt)
        rows.append((image_id, labels))
        tick()
        for d in dups_of.get(i, []):
            copy = _near_duplicate(arr, np.random.default_rng([seed, 3, d]))
            _write_image(out / "train", dup_ids[d], copy, fmt)
            rows.append((dup_ids[d], labels))
            dup_rows.append((dup_ids[d], image_id))
            tick()
    for i, (image_id, labels) in enumerate(zip(test_ids, test_labels)):
        arr = draw_field(labels, fmt, size, np.random.default_rng([seed, 2, i]), easy)
        _write_image(out / "test", image_id, arr, fmt)
        tick()

    def joined(labels):
        return " ".join(str(x) for x in labels)

    # train.csv goes last: its presence means the folder is complete.
    if fmt == "z2g":
        order = rng.permutation(len(rows))  # the real file is in no particular order
        train_df = pd.DataFrame({"Image": [rows[j][0] for j in order],
                                 "Label": [joined(rows[j][1]) for j in order]})
        write_csv(out / "submission.csv", pd.DataFrame({"Image": test_ids, "Label": ["0"] * n_test}))
    else:
        rows.sort(key=lambda r: r[0])  # the real file is sorted by Id
        train_df = pd.DataFrame({"Id": [r[0] for r in rows], "Target": [joined(r[1]) for r in rows]})
        write_csv(out / "sample_submission.csv",
                  pd.DataFrame({"Id": sorted(test_ids), "Predicted": ["0"] * n_test}))
    if n_dup:
        write_csv(out / "duplicates.csv", pd.DataFrame({"Id": [r[0] for r in dup_rows],
                                                        "duplicate_of": [r[1] for r in dup_rows]}))
    write_csv(out / "train.csv", train_df)
    return out
