"""HPAv18 external data: which bands of the Atlas's colour stain JPEGs recover the stain, how far
the colour check's threshold is from real stains and from wrong files, and what the download
stores per image at each --size, with the CPU time per file. Needs the real Kaggle sample in
../shared/hpa_real (or $HPA_REAL); nothing is downloaded.

Real 512 px grayscale stains are written as the Atlas draws them (the stain in its colour on
black) as JPEGs at several qualities, and read back. The Atlas's own JPEG settings are not known
here, so quality 75 with 4:2:0 chroma subsampling (PIL's default, the harsher case) and 95
without subsampling bracket them.
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
from pathlib import Path

import _common as C

SIZES = [256, 512, 1024, 2048]
JPEG_SETTINGS = [(75, 2), (90, 2), (95, 0), (30, 2)]  # (quality, subsampling: 2 = 4:2:0, 0 = 4:4:4)


def real_dir() -> Path:
    root = Path(os.environ.get("HPA_REAL") or C.REPO.parent / "shared" / "hpa_real")
    return root / "kaggle2018"


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=65, help="real images to use (the sample has 65)")
    p.set_defaults(rounds=3)
    args = C.parse(p, argv)

    import numpy as np
    from PIL import Image

    from hpa_fastai.data.images import MAX_OFF_COLOUR, STAIN_COLOURS, colour_stain_shares, read_stain
    from hpa_fastai.data.layouts import CHANNELS

    folder = real_dir() / "rgby_sample" / "train"
    ids = sorted({f.name.rsplit("_", 1)[0] for f in folder.glob("*_green.png")})[:args.n]
    if not ids:
        raise SystemExit(f"no real images in {folder}: set HPA_REAL to the real-data folder")
    gray = {(i, s): np.asarray(Image.open(folder / f"{i}_{s}.png")) for i in ids for s in CHANNELS}
    scratch = Path(tempfile.mkdtemp(prefix="bench-hpav18-"))

    def coloured(pixels, stain):
        return pixels[..., None] * np.asarray(STAIN_COLOURS[stain], np.uint8)

    def jpeg(path, pixels, quality, subsampling):
        Image.fromarray(pixels).save(path, format="JPEG", quality=quality, subsampling=subsampling)
        return path

    # --- which bands recover the stain ---------------------------------------------------------
    rows, shares = [], {"stain": [], "wrong colour": [], "three stains (RGB composite)": [], "gray RGB": []}
    for quality, sub in JPEG_SETTINGS:
        for stain in CHANNELS:
            errors = {k: [] for k in ("read_stain", "R", "G", "B", "mean R,G", 'convert("L")', "luma / weight")}
            for i in ids:
                truth = gray[(i, stain)].astype(float)
                path = jpeg(scratch / f"x_{stain}.jpg", coloured(gray[(i, stain)], stain), quality, sub)
                rgb = np.asarray(Image.open(path), float)
                found = {"read_stain": np.asarray(read_stain(str(path), stain), float), "R": rgb[..., 0],
                         "G": rgb[..., 1], "B": rgb[..., 2], "mean R,G": rgb[..., :2].mean(-1),
                         'convert("L")': np.asarray(Image.open(path).convert("L"), float),
                         # the full-resolution luma divided by the stain colour's weight in it: not
                         # blurred by chroma subsampling, but its noise is multiplied by 1/weight
                         "luma / weight": np.clip(rgb @ np.float64([0.299, 0.587, 0.114]) / float(
                             np.float64([0.299, 0.587, 0.114]) @ STAIN_COLOURS[stain]), 0, 255)}
                for k, v in found.items():
                    errors[k].append(float(np.sqrt(((v - truth) ** 2).mean())))
                shares["stain"].append(colour_stain_shares(str(path), stain)[0])
                if quality == 95:  # the wrong files, once
                    wrong = CHANNELS[(CHANNELS.index(stain) + 1) % 4]
                    for name, pixels in (("wrong colour", coloured(gray[(i, stain)], wrong)),
                                         ("three stains (RGB composite)",
                                          np.stack([gray[(i, s)] for s in ("red", "green", "blue")], -1)),
                                         ("gray RGB", np.stack([gray[(i, stain)]] * 3, -1))):
                        bad = jpeg(scratch / f"bad_{stain}.jpg", pixels, quality, sub)
                        shares[name].append(colour_stain_shares(str(bad), stain)[0])
            rows.append({"JPEG": f"q{quality} {'4:2:0' if sub == 2 else '4:4:4'}", "stain": stain,
                         **{f"RMSE {k}": round(statistics.mean(v), 2) for k, v in errors.items()}})
    C.record("HPAv18 colour stains: RMSE against the real grayscale stain, by band read", rows,
             {"images": len(ids), "source": "rgby_sample/train, 512 px"},
             [f"share of intensity outside the stain's colour (refused above {MAX_OFF_COLOUR}): "
              + "; ".join(f"{k} {min(v):.3f}-{max(v):.3f}" for k, v in shares.items() if v),
              "gray RGB files are accepted by the band-spread test, whatever their share",
              "luma / weight beats the band where chroma is subsampled (4:2:0) and loses without it (4:4:4); "
              "the Atlas's own encoder settings decide which is better on its files"], record=not args.no_record)

    # --- what a download stores, and the CPU it costs per file -----------------------------------
    n_ids = 74606
    labels = real_dir() / "HPAv18RBGY_wodpl.csv"
    if labels.is_file():
        n_ids = sum(1 for _ in open(labels)) - 1
    sample = ids[:16]
    size_rows = []
    per_pixel_png = None
    for size in SIZES:
        nbytes = []
        for i in sample:
            for stain in CHANNELS:
                im = Image.fromarray(gray[(i, stain)]).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                nbytes.append(len(buf.getvalue()))
        mean = statistics.mean(nbytes)
        if size == 512:
            per_pixel_png = mean / 512 ** 2
        size_rows.append({"stored as": f"{size} px grayscale PNG", "KB per stain file": round(mean / 1e3, 1),
                          "how": "measured: real 512 px stains resized" + (
                              " up, smoother than real: a lower bound" if size > 512 else "")})
    for size in (1024, 2048):
        size_rows.append({"stored as": f"{size} px grayscale PNG", "KB per stain file": round(
            per_pixel_png * size ** 2 / 1e3, 1), "how": "estimate: bytes per pixel at 512 px x pixels"})
    jpeg_bytes = []
    for i in sample:
        for stain in CHANNELS:
            buf = io.BytesIO()
            Image.fromarray(coloured(gray[(i, stain)], stain)).save(buf, format="JPEG", quality=90)
            jpeg_bytes.append(len(buf.getvalue()))
    per_pixel_jpeg = statistics.mean(jpeg_bytes) / 512 ** 2
    size_rows.append({"stored as": "2048 px colour JPEG (the server's, no --size)",
                      "KB per stain file": round(per_pixel_jpeg * 2048 ** 2 / 1e3, 1),
                      "how": "estimate: bytes per pixel of real 512 px stains as colour JPEGs (q90) x pixels"})
    for row in size_rows:
        row["GB for all ids"] = round(row["KB per stain file"] * 1e3 * 4 * n_ids / 1e9, 1)
    # CPU per file: the server's 2048 px colour JPEG (a real stain resized up) to what is stored
    cpu_rows = []
    big = {s: jpeg(scratch / f"big_{s}.jpg", coloured(np.asarray(Image.fromarray(gray[(ids[0], s)]).resize(
        (2048, 2048), Image.BILINEAR)), s), 90, 2) for s in CHANNELS}
    for size in [256, 512, 1024, None]:
        def store():
            for s, path in big.items():
                stain = read_stain(str(path), s, size)
                if size is not None and stain.size != (size, size):
                    stain = stain.resize((size, size), Image.BILINEAR)
                stain.save(io.BytesIO(), format="PNG")
        times = C.interleaved({"store": store}, args.rounds)["store"]
        cpu_rows.append({"--size": size or "none (PNG at 2048)", "ms per stain file": round(min(times) / 4 * 1e3, 1)})

    def full_decode():
        for path in big.values():
            with Image.open(path) as im:
                im.load()
    times = C.interleaved({"decode": full_decode}, args.rounds)["decode"]
    cpu_rows.append({"--size": "jpg (kept as served; decoded once to check)",
                     "ms per stain file": round(min(times) / 4 * 1e3, 1)})
    # training from the server's JPEGs (no --size): read_image decodes them in draft mode
    from hpa_fastai.data.images import read_image, stain_band

    key = str(scratch / "big_{channel}.jpg")
    read_rows = []
    for size in (256, 512, 1024):
        def draft():
            read_image(key, CHANNELS, size)

        def whole():  # what read_image did before draft mode: decode all of it, then resize
            bands = []
            for s, path in big.items():
                with Image.open(path) as im:
                    im.load()
                    bands.append(stain_band(im, s))
            np.asarray(Image.merge("CMYK", bands).resize((size, size), Image.BILINEAR))
        times = C.interleaved({"draft": draft, "whole": whole}, args.rounds)
        read_rows.append({"--size": size, "ms per image, read_image": round(min(times["draft"]) * 1e3, 1),
                          "ms per image, whole decode + resize": round(min(times["whole"]) * 1e3, 1),
                          **C.ratio(times, "draft", "whole")})
    C.record("HPAv18 training input: four 2048 px colour JPEG stains to one image of --size", read_rows,
             {"rounds": args.rounds, "image": "a real 512 px stain resized to 2048, colour JPEG q90 4:2:0"},
             record=not args.no_record)
    C.record("HPAv18 download: disk per stain file and for the whole set, by --size", size_rows,
             {"ids in the label CSV": n_ids, "stain files": 4 * n_ids, "real stains sampled": len(sample) * 4},
             record=not args.no_record)
    C.record("HPAv18 download: CPU per stain file, from the server's 2048 px colour JPEG", cpu_rows,
             {"rounds": args.rounds, "decode": "PIL draft mode when --size is smaller"},
             ["the download itself is bound by the network: every --size fetches the full JPEGs"],
             record=not args.no_record)
    return {"rows": rows, "sizes": size_rows, "cpu": cpu_rows}


if __name__ == "__main__":
    main()
