"""Batch-system figures on a real Slurm: start-up, the cost of a killed worker, resume.

Needs a Slurm that answers (``sudo scripts/start-slurm``).  Uses the Welch
job of ``scripts/bench_pipeline.py`` on its stacks (4096x4096 float32 pairs,
tiles 256, kernel 21, diagnostics on, so that a run lasts long enough to
disturb), written there if missing.  Prints, in one run:

1. worker jobs (``compute.scheduler: slurm``, 2 jobs x 1 core) on the
   16-pair stack: seconds from ``run_job`` to the first worker, to the first
   block written, and to the end;
2. the same run with one worker process SIGKILLed once a quarter of the
   blocks are written (its nanny restarts it): the end time, the slowdown
   against (1), and whether the result is identical;
3. ``kernelmap submit`` (the whole 4-pair job in one 2-CPU allocation): seconds from
   submission to the first block and to the end; then the same job
   ``scancel``-ed at a quarter and finished with ``output.mode=resume``:
   blocks skipped, blocks computed, and whether the result is identical.

Usage::

    python scripts/bench_batch.py [--dir /tmp/kernelmap-bench]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def _job(store: Path, out: Path, logs: Path, name: str) -> dict:
    return {
        "input": {"path": str(store)},
        "tiles": {"size": 256},
        "kernel": {"size": 21, "method": "welch"},
        "output": {"path": str(out), "mode": "overwrite"},
        "compute": {"scheduler": "slurm",
                    "batch": {"queue": "debug", "cores": 1, "memory": "4GB", "walltime": "00:20:00",
                              "interface": "lo", "jobs": 2, "job_extra_directives": ["--no-requeue"],
                              "log_directory": str(logs), "options": {"job_name": name}}},
    }


def _blocks_done(path: Path) -> int:
    from pipeline.io.store import OutputStore

    try:
        return int(OutputStore(str(path)).completed_blocks().sum())
    except Exception:  # not created yet, or a chunk caught mid-write
        return 0


def _watch(path: Path, t0: float, marks: dict, at: int, stop: threading.Event) -> threading.Thread:
    """Record when the first block and when ``at`` blocks are written."""
    def run():
        while not stop.is_set():
            done = _blocks_done(path)
            if done >= 1 and "first" not in marks:
                marks["first"] = time.perf_counter() - t0
            if done >= at and "at" not in marks:
                marks["at"] = time.perf_counter() - t0
                marks["done_at"] = done
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _worker_processes() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any("spawn_main" in part for part in cmd):
            parent = proc.parent()
            if parent is not None and "dask_worker" in " ".join(parent.cmdline()):
                found.append(proc)
    return found


def _identical(a: Path, b: Path) -> bool:
    import xarray as xr

    x, y = xr.open_zarr(a).load(), xr.open_zarr(b).load()
    return x.drop_attrs().identical(y.drop_attrs())


def worker_jobs(store: Path, tmp: Path, kill: bool, blocks: int) -> dict:
    from pipeline.job.config import job_from_dict
    from pipeline.job.run import run_job

    out = tmp / ("killed.zarr" if kill else "clean.zarr")
    data = _job(store, out, tmp / "logs", f"km-bench-{uuid.uuid4().hex[:6]}")
    marks: dict = {}
    lines: list[tuple[float, str]] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    _watch(out, t0, marks, blocks // 4, stop)
    killer = None
    if kill:
        def kill_one():
            while "at" not in marks and not stop.is_set():
                time.sleep(0.02)
            workers = _worker_processes()
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                marks["killed"] = time.perf_counter() - t0
        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
    summary = run_job(job_from_dict(data), progress=False,
                      log=lambda m: lines.append((time.perf_counter() - t0, m)))
    marks["end"] = time.perf_counter() - t0
    stop.set()
    first_worker = next((t for t, m in lines if "first worker up" in m), float("nan"))
    marks["first_worker"] = first_worker
    marks["tiles"] = summary.tiles_computed
    return marks


def whole_job(store: Path, tmp: Path) -> dict:
    import yaml

    from pipeline.cli import main
    from pipeline.job.submit import Submission, wait_for_job

    out = tmp / "submitted.zarr"
    data = _job(store, out, tmp / "logs", "unused")
    data["compute"] = {"batch": {"queue": "debug", "cores": 2, "memory": "8GB", "walltime": "00:20:00"}}
    job_file = tmp / "submit-job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    res: dict = {}
    # clean run
    marks: dict = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    _watch(out, t0, marks, 16, stop)
    code = main(["submit", str(job_file), "--wait"])
    res["clean_end"] = time.perf_counter() - t0
    stop.set()
    res["clean_first"] = marks.get("first", float("nan"))
    res["clean_code"] = code
    shutil.copytree(out, tmp / "submitted-clean.zarr", dirs_exist_ok=True)
    shutil.rmtree(out)  # the cancelled run starts from nothing
    # cancelled at a quarter, then resumed
    marks = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    watcher = _watch(out, t0, marks, 16, stop)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["submit", str(job_file)])
    job_id = buf.getvalue().splitlines()[1]
    while "at" not in marks and time.perf_counter() - t0 < 300:
        time.sleep(0.02)
    subprocess.run(["scancel", job_id], check=True, timeout=10)
    res["cancel_code"] = wait_for_job(Submission("slurm", out.parent / "x", job_id), poll=0.5,
                                      log=lambda _m: None)
    stop.set()
    watcher.join()
    res["done_at_cancel"] = _blocks_done(out)
    t1 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res["resume_code"] = main(["submit", str(job_file), "--wait", "--set", "output.mode=resume"])
    res["resume_seconds"] = time.perf_counter() - t1
    job_id = buf.getvalue().splitlines()[1]  # lines: "submitted ...", the job id, "job ... finished ..."
    log = Path(str(out) + ".batch") / f"submit-{job_id}.log"
    text = log.read_text() if log.exists() else ""
    m = re.search(r"(\d+) of (\d+) blocks already done", text)
    res["skipped"] = int(m.group(1)) if m else None
    res["total_blocks"] = int(m.group(2)) if m else None
    res["identical"] = _identical(out, tmp / "submitted-clean.zarr")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/kernelmap-bench")
    args = p.parse_args()
    import bench_pipeline

    base = Path(args.dir)
    store, large = base / "pairs-4.zarr", base / "pairs-16.zarr"
    bench_pipeline.ensure_data({4: store, 16: large}, print)
    tmp = base / "batch"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    clean = worker_jobs(large, tmp, kill=False, blocks=256)
    killed = worker_jobs(large, tmp, kill=True, blocks=256)
    same = _identical(tmp / "clean.zarr", tmp / "killed.zarr")
    whole = whole_job(store, tmp)
    print()
    print("Slurm; Welch with diagnostics on 4096x4096 pairs, tiles 256 (16 blocks of 16 tiles a pair)")
    print(f"(1) 16 pairs (256 blocks), worker jobs 2 x 1 core: first worker {clean['first_worker']:.1f} s, first block "
          f"{clean.get('first', float('nan')):.1f} s, end {clean['end']:.1f} s after run_job")
    print(f"(2) one worker process SIGKILLed at {killed.get('killed', float('nan')):.1f} s "
          f"({killed.get('done_at', '?')} of 256 blocks written): end {killed['end']:.1f} s, "
          f"slowdown {killed['end'] - clean['end']:+.1f} s ({killed['end'] / clean['end']:.2f}x); "
          f"result identical to (1): {same}")
    print(f"(3) 4 pairs (64 blocks), kernelmap submit --wait, one 2-CPU allocation: "
          f"first block {whole['clean_first']:.1f} s, "
          f"end {whole['clean_end']:.1f} s after submission (exit {whole['clean_code']})")
    print(f"    scancel at a quarter ({whole['done_at_cancel']} of 64 blocks written; --wait exit "
          f"{whole['cancel_code']}), then submit --set output.mode=resume --wait: exit "
          f"{whole['resume_code']} in {whole['resume_seconds']:.1f} s, {whole['skipped']} blocks skipped, "
          f"{(whole['total_blocks'] or 0) - (whole['skipped'] or 0)} computed; identical to the "
          f"uninterrupted run: {whole['identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
