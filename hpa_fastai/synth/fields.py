"""The cell field of one synthetic image (cells, nuclei, microtubule fibres, ER) and the image
kernels and stamping helpers the stain patterns draw with."""
from __future__ import annotations

import numpy as np
from PIL import Image

# Every field is built on the full pixel grid with numpy; per-cell work is done inside each
# cell's bounding box, and spots are stamped with one bincount per call.


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
