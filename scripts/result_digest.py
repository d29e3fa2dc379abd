"""Digests of every array kernelmap writes, for a set of jobs on the demo stack.

Run it before and after a change that must not change results; the two
outputs must be identical line for line::

    .venv/bin/python scripts/result_digest.py /tmp/before > before.txt
    ... change the code ...
    .venv/bin/python scripts/result_digest.py /tmp/after > after.txt
    diff before.txt after.txt

It uses only the ``kernelmap`` command and Zarr, so it runs on any version.
The jobs cover every method, bad pixels (NaN and a mask array), overlapping
tiles, float64 output, fixed and automatic regularisation, diagnostics off,
the threads scheduler and a resumed run.  Each line is an array's path and
the SHA-256 of its values (attributes such as creation times are left out,
except the effective configuration without its paths, digested on its own line).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
import zarr

#: File marking a working folder as this script's (it replaces only such folders).
MARKER = ".result-digest"
#: Job variants: name -> overrides of the demo job.
VARIANTS: dict[str, list[str]] = {
    "lstsq": [],
    "lstsq-mask": ["input.mask=mask"],
    "lstsq-overlap-f64": ["tiles.step=96", "output.dtype=float64", "kernel.normalize=true"],
    "lstsq-wings-fixed": ["kernel.penalty=wings", "kernel.regularization=[0.1, 0.01]", "kernel.robust=false"],
    "lstsq-laplacian": ["kernel.penalty=laplacian", "kernel.recentre=false"],
    "lstsq-threads": ["compute.scheduler=threads", "compute.block_tiles=2"],
    "welch": ["kernel.method=welch", "kernel.segment_size=48", "input.mask=mask"],
    "welch-nodiag": ["kernel.method=welch", "kernel.diagnostics=false", "kernel.window=tukey"],
    "ratio": ["kernel.method=ratio"],
}


def kernelmap(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("kernelmap")), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


def add_mask(stack: Path) -> None:
    """A mask array beside the demo's source and target: bad columns and scattered pixels."""
    group = zarr.open_group(stack, mode="r+")
    shape = group["target"].shape
    rng = np.random.default_rng(7)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[:, :, 37] = 1
    mask[rng.random(shape) < 0.001] = 4
    arr = group.create_array("mask", shape=shape, chunks=group["target"].chunks, dtype="uint8",
                             dimension_names=("image", "y", "x"))
    arr[...] = mask


def digest(store: Path) -> list[str]:
    group = zarr.open_group(store, mode="r")
    lines = []

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, member in sorted(g.members()):
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            else:
                values = np.asarray(member[...])
                text = values.astype(str) if values.dtype == object else values
                sha = hashlib.sha256(np.ascontiguousarray(text).tobytes()).hexdigest()[:16]
                lines.append(f"{prefix}{name} {values.dtype} {values.shape} {sha}")

    walk(group, "")
    config = yaml.safe_load(str(group.attrs.get("kernelmap_config", "{}")))
    for section in ("input", "output"):  # where the folder is: not part of the result
        config.get(section, {}).pop("path", None)
    text = yaml.safe_dump(config, sort_keys=True)
    lines.append(f"attrs/kernelmap_config {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path,
                        help="working folder for the stack and the jobs' outputs: new, empty, or made by this script")
    args = parser.parse_args()
    folder: Path = args.folder
    marker = folder / MARKER
    if folder.exists() and any(folder.iterdir()) and not marker.exists():
        raise SystemExit(f"{folder} is not empty and was not made by this script: give a new folder")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marker.write_text("made by scripts/result_digest.py; replaced on its next run\n")
    kernelmap("demo", "--dir", str(folder / "demo"), "--images", "3", "--size", "512")
    stack = folder / "demo" / "stack.zarr"
    add_mask(stack)
    job = yaml.safe_load((folder / "demo" / "kernels.zarr" / "zarr.json").read_text())
    config = yaml.safe_load(job["attributes"]["kernelmap_config"])
    config["compute"]["dashboard_address"] = None
    config["kernel"] = {"size": config["kernel"]["size"]}  # each variant picks its method
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(config))
    for name, overrides in VARIANTS.items():
        out = folder / f"{name}.zarr"
        sets = [a for o in [*overrides, f"output.path={out}", "output.mode=create"] for a in ("--set", o)]
        kernelmap("run", str(job_file), "--quiet", *sets)
        print(f"# {name}: {' '.join(overrides) or 'defaults'}")
        print("\n".join(digest(out)))
    # a resumed run: drop the records of some blocks, run again with mode resume
    out = folder / "lstsq.zarr"
    records = zarr.open_group(out, mode="r+")["status/records"]
    records[1:, :2] = np.nan
    kernelmap("run", str(job_file), "--quiet", "--set", f"output.path={out}", "--set", "output.mode=resume")
    print("# lstsq resumed after losing blocks")
    print("\n".join(digest(out)))


if __name__ == "__main__":
    main()
