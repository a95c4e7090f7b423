"""The green stain of each class: one function per class name, taking a field and returning a
float32 map with structures at ~1 where the protein sits; PATTERNS maps class names to them."""
from __future__ import annotations

import numpy as np

from .fields import _gauss_kernel, _ring_kernel, _rod_kernel


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
