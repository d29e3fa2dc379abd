"""How many files a kernel map of many small images is, and its write time per image.

For each ``--images`` count, a stack of that many small images (``--size``²,
the demo's simulated epochs cycled, one shared source) is written once under
``--dir``, then the default job runs on it (tiles 128, kernel 15, threads),
a whole ``kernelmap run`` process.  Printed per count: the files of the
output store (and of its largest array), seconds, seconds per image; with
``--apply`` the same of a whole ``kernelmap apply`` process on the kernel map
(the matched and difference images).  A 10,000-image stack must not mean
millions of small files: the count should grow with shards, not with chunks.

Usage::

    python scripts/bench_files.py [--images 16 256 4096] [--size 256] [--apply] [--dir /tmp/kernelmap-bench-files]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stack(path: Path, n: int, size: int) -> Path:
    """``n`` target images of ``size``² (the demo's 4 epochs cycled) and their shared source, written once."""
    import xarray as xr

    from pipeline.sim.demo import demo_dataset

    if (path / "zarr.json").exists():
        return path
    ds, _ = demo_dataset(n_images=4, size=size, bad_pixels=False)
    target = np.stack([ds["target"].values[i % 4] for i in range(n)])
    out = xr.Dataset({"source": ds["source"], "target": (("image", "y", "x"), target)},
                     coords={"image": ("image", np.array([f"img-{i:05d}" for i in range(n)], dtype=object))})
    out.to_zarr(path, mode="w", consolidated=False,
                encoding={"target": {"chunks": (1, size, size)}, "source": {"chunks": (size, size)}})
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[16, 256, 4096])
    p.add_argument("--size", type=int, default=256, help="image side (tiles of 128: (size / 128)² tiles)")
    p.add_argument("--apply", action="store_true", help="also kernelmap apply on each kernel map")
    p.add_argument("--dir", default="/tmp/kernelmap-bench-files")
    args = p.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    kernelmap = str(Path(sys.executable).with_name("kernelmap"))
    print(f"images of {args.size}², tiles 128, kernel 15, the default job in threads")
    print(f"{'images':>7} {'command':>8} {'files':>8} {'largest array':>24} {'seconds':>8} {'s/image':>8}")
    for n in args.images:
        source = stack(folder / f"stack-{n}.zarr", n, args.size)
        out = folder / f"kernels-{n}.zarr"
        job = folder / f"job-{n}.yaml"
        job.write_text(f"input: {{path: {source}}}\ntiles: {{size: 128}}\nkernel: {{size: 15}}\n"
                       f"output: {{path: {out}, mode: overwrite}}\ncompute: {{scheduler: threads}}\n")
        commands = [("run", out, [kernelmap, "run", str(job), "--quiet"])]
        if args.apply:
            images = folder / f"images-{n}.zarr"
            commands.append(("apply", images, [kernelmap, "apply", str(out), "--out", str(images), "--overwrite"]))
        for command, written, argv in commands:
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            seconds = time.perf_counter() - t0
            files = [f for f in written.rglob("*") if f.is_file()]
            per_array = Counter(f.relative_to(written).parts[0] for f in files)
            name, most = per_array.most_common(1)[0]
            print(f"{n:7d} {command:>8} {len(files):8d} {f'{name} ({most})':>24} {seconds:8.1f} {seconds / n:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
