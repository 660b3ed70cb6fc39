"""Real broken and unusual image files, and what Pillow makes of them.

`pillow_test_images()` returns the JPEG/PNG test files of Pillow 13.0.0's
source distribution (`Tests/images/*.jpg` and a few PNGs), extracted into
`<repo>/.cache/pillow-images/`: on first use it downloads the sdist (47 MB)
with `pip download --no-deps --no-binary pillow pillow==13.0.0` into
`<repo>/.cache/sdist/` (as data-and-infra.md section 1b says; a plain
`--no-binary :all:` would try to build setuptools) and extracts only those
members. Running it again does nothing.

`generate(out_dir)` copies them into `out_dir/files/`, adds what the sdist
lacks (a zero-byte file, a text file named `.JPEG`, a > 50-megapixel JPEG, a
header claiming 200 megapixels, a grayscale PNG), and writes
`manifest.json`: for each file whether Pillow's `Image.open(f).convert('RGB')`
succeeds (the way timm reads images), its mode, size, progressive flag and
EXIF orientation, or Pillow's error. For the decodable files below 4
megapixels, `files/<name>.rgb.npy` holds Pillow's pixels.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
SDIST_DIR = CACHE / "sdist"
IMAGES = CACHE / "pillow-images"
SDIST = "pillow-13.0.0.tar.gz"
PNGS = {"truncated_image.png", "truncated_end_chunk.png", "hopper.png"}


class AssetError(RuntimeError):
    """The Pillow sdist could not be downloaded or lacks the test images."""


def _sdist() -> Path:
    path = SDIST_DIR / SDIST
    if path.is_file():
        return path
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pillow",
           "--disable-pip-version-check", "-d", str(SDIST_DIR), "pillow==13.0.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise AssetError(f"could not download the Pillow sdist (`{' '.join(cmd)}` exited with "
                         f"{proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return path


def pillow_test_images() -> list[Path]:
    """The extracted Pillow test images, sorted by name."""
    index = IMAGES / ".extracted.txt"
    if index.is_file():
        listed = [IMAGES / n for n in index.read_text().split()]
        if listed and all(p.is_file() for p in listed):
            return sorted(listed)
    IMAGES.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(_sdist()) as tf:
        for m in tf.getmembers():
            parts = m.name.split("/")
            if len(parts) != 4 or parts[1:3] != ["Tests", "images"] or not m.isfile():
                continue
            name = parts[3]
            if not (name.lower().endswith(".jpg") or name in PNGS):
                continue
            data = tf.extractfile(m).read()
            tmp = IMAGES / f"{name}.tmp{os.getpid()}"
            tmp.write_bytes(data)
            tmp.replace(IMAGES / name)
            out.append(IMAGES / name)
    if not out:
        raise AssetError(f"{SDIST} holds no Tests/images/*.jpg")
    index.write_text("".join(p.name + "\n" for p in out))
    return sorted(out)


def _pillow_verdict(path: Path) -> dict:
    rec = {"file": path.name}
    try:
        with Image.open(path) as im:
            rec["mode"] = im.mode
            rec["format"] = im.format
            rec["progressive"] = bool(im.info.get("progressive") or im.info.get("progression"))
            try:
                rec["orientation"] = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - broken EXIF is part of the test set
                rec["orientation"] = None
            rgb = im.convert("RGB")
        rec["ok"] = True
        rec["size"] = list(rgb.size)
        if rgb.size[0] * rgb.size[1] <= 4_000_000:
            np.save(path.parent / f"{path.name}.rgb.npy", np.asarray(rgb))
            rec["pixels"] = True
        else:
            # A 1/64 grid of pixels is enough to check a huge image.
            a = np.asarray(rgb)[::64, ::64]
            np.save(path.parent / f"{path.name}.grid64.npy", np.ascontiguousarray(a))
            rec["pixels"] = False
    except Exception as e:  # noqa: BLE001 - recording Pillow's failure is the point
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def generate(out: Path) -> None:
    files = out / "files"
    if files.exists():
        shutil.rmtree(files)
    files.mkdir(parents=True)
    for p in pillow_test_images():
        shutil.copyfile(p, files / p.name)
    # What the sdist lacks.
    (files / "zero_bytes.JPEG").write_bytes(b"")
    (files / "not_an_image.JPEG").write_bytes(b"<html><body>404 Not Found</body></html>\n")
    w, h = 8200, 6200  # 50.8 megapixels
    g = Image.linear_gradient("L")
    big = Image.merge("RGB", [g.resize((w, h)), g.rotate(90).resize((w, h)),
                              Image.open(files / "hopper.jpg").convert("L").resize((w, h))])
    big.save(files / "huge_50mp.jpg", quality=75)
    del big
    # A valid JPEG whose header claims 20000 x 10000 pixels (Pillow's
    # decompression-bomb error): patch the SOF0 dimensions of hopper.jpg.
    data = bytearray((files / "hopper.jpg").read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 7] = (10000).to_bytes(2, "big")
    data[sof + 7:sof + 9] = (20000).to_bytes(2, "big")
    (files / "bomb_200mp.jpg").write_bytes(bytes(data))
    gray = Image.open(files / "hopper.jpg").convert("L")
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    (files / "gray.png").write_bytes(buf.getvalue())

    manifest = {"files": [_pillow_verdict(p) for p in sorted(files.iterdir())
                          if not p.name.endswith(".npy")]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    for p in pillow_test_images():
        print(p)
