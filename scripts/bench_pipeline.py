"""Whole-process benchmark: ``kernelmap run`` against the Welch floor ``../shared/bench/limit.py``.

Main table (always printed).  The pairs are the floor's own workload W
(``../shared/bench/gen_data.py``: 4 pairs of 4096x4096 float32, arrays ``S``
and ``R``, Blosc-zstd, chunks 1x1024x1024, under ``$KERNELMAP_BENCH_WORK``,
default ``/tmp/benchwork``; generated there first if missing, a few minutes
and ~2.5 GB).  Two sizes:

- 4 pairs: ``limit.py --repeats 1`` against ``kernelmap run`` on W's store itself;
- 16 pairs: ``limit.py --repeats 4`` (W's 4 pairs processed 4 times in one
  process) against ``kernelmap run`` on a 16-pair stack holding W's pairs 0-3
  four times over (same codec and chunks; written once under ``--dir``).

Each is a whole process, timed from the outside (start-up, imports, reading,
estimating, writing, and for ``kernelmap run`` its cluster and the per-image
finishing included): ``python limit.py --threads 2 --backend pyfftw --store
blosczstd:1024 --out --repeats R`` and ``kernelmap run job.yaml`` with the
default job (tiles 256, kernel 21, diagnostics on, the kernel-field model on:
the joint fit with lstsq, the model of the kernels with welch; a local cluster
of 2 workers x 1 thread) for ``kernel.method`` ``welch`` and
the default ``lstsq``.  They run interleaved -- limit, welch, lstsq, limit,
welch, lstsq, ... -- for ``--rounds`` rounds (default 3; ``--quick``: 1), so
that a change in the machine's load hits all three alike.  Printed per run:
the median seconds (all rounds in brackets), Mpix/s and tiles/s (image pixels
and 256x256 tiles of the pairs processed: one pair is 16.8 Mpix and 256
tiles), the ratio of the medians to the floor's and the median of the
per-round ratios, the cores other processes used meanwhile, and the targets:
Welch within 1.5x of the floor on 16 pairs; the default (lstsq) at least 10
Mpix/s (150 tiles/s) and within 3.5x of the floor.

``--welch-bare`` adds Welch with the tiles' diagnostics off (``kernel:
{method: welch, diagnostics: false}``, the model still on), the
configuration in which the floor's targets were first set and met;
``--welch-fast`` adds Welch with the defect searches off as well
(``find_defects: false``): the fastest Welch job, for inputs whose bad
pixels are all masked.

``--joint`` adds the default job with ``model.method: kernels`` (the model
fitted to the tile kernels instead of the default joint fit) and prints what
the default joint model adds to it (target: at most 20 %).

``--details`` adds the older, longer measurements on the script's own
synthetic stacks (``--pairs-small``/``--pairs-large``): the in-process Welch
core floor, ``run_job`` on running LocalClusters with three worker
environments (glibc's ``MALLOC_*`` thresholds unset / dask's trim of 65536 / ``WORKER_ENV``'s), the peak
RSS of the workers, and where the time of one block goes.

Usage::

    python scripts/bench_pipeline.py [--quick] [--rounds 3] [--work /tmp/benchwork]
        [--limit ../shared/bench/limit.py] [--dir /tmp/kernelmap-bench] [--keep]
        [--details [--pairs-small 4] [--pairs-large 16] [--repeats 3] [--repeats-large 2] [--skip-lstsq]]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 4096
CHUNK = 1024
TILE = 256
KERNEL = 21
SEED = 20240611
DATA_VERSION = 1
GB = 1e9
MiB = 2**20
TRIM = "MALLOC_TRIM_THRESHOLD_"
MALLOC = (TRIM, "MALLOC_MMAP_THRESHOLD_")  #: the allocator settings the worker environments vary


# --------------------------------------------------------------------------- data


def _store_ready(path: Path, n: int) -> bool:
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
        return g.attrs.get("bench_data") == {"version": DATA_VERSION, "pairs": n, "size": SIZE,
                                              "chunk": CHUNK, "seed": SEED}
    except Exception:  # anything unreadable is regenerated
        return False


def _base_fields(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free source and target: target = 1.1 * (G(sigma 2) * source) + 3."""
    from scipy.ndimage import gaussian_filter

    stars = np.zeros((SIZE, SIZE), dtype=np.float32)
    n = SIZE * SIZE // 600
    ys, xs = rng.integers(0, SIZE, n), rng.integers(0, SIZE, n)
    np.add.at(stars, (ys, xs), ((rng.pareto(1.5, n) + 1.0) * 300.0).astype(np.float32))
    sky = gaussian_filter(rng.standard_normal((SIZE, SIZE), dtype=np.float32), 6.0)
    src = gaussian_filter(stars, 1.3) + 100.0 + 40.0 * sky
    tgt = 1.1 * gaussian_filter(src, 2.0) + 3.0
    return src.astype(np.float32), tgt.astype(np.float32)


def ensure_data(paths: dict[int, Path], log) -> float:
    """Write the stacks that are missing; returns the seconds spent (0 when reused)."""
    import zarr
    from zarr.codecs import BloscCodec

    todo = {n: p for n, p in paths.items() if not _store_ready(p, n)}
    if not todo:
        return 0.0
    t0 = time.perf_counter()
    log(f"writing synthetic stacks {', '.join(f'{n} pairs -> {p}' for n, p in sorted(todo.items()))} ...")
    rng = np.random.default_rng(SEED)
    base_s, base_t = _base_fields(rng)
    arrays = {}
    for n, p in todo.items():
        shutil.rmtree(p, ignore_errors=True)
        g = zarr.open_group(str(p), mode="w", zarr_format=3)
        for name in ("source", "target"):
            arrays[n, name] = g.create_array(
                name, shape=(n, SIZE, SIZE), chunks=(1, CHUNK, CHUNK), dtype="float32",
                compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                dimension_names=("image", "y", "x"), fill_value=0.0,
            )
    for i in range(max(todo)):
        r = np.random.default_rng([SEED, i])
        shift = ((389 * i) % SIZE, (677 * i) % SIZE)
        src = np.roll(base_s, shift, axis=(0, 1))
        src += 2.0 * r.standard_normal((SIZE, SIZE), dtype=np.float32)
        tgt = np.roll(base_t, shift, axis=(0, 1))
        tgt += 2.0 * r.standard_normal((SIZE, SIZE), dtype=np.float32)
        for n in todo:
            if i < n:
                arrays[n, "source"][i] = src
                arrays[n, "target"][i] = tgt
    for n, p in todo.items():
        zarr.open_group(str(p), mode="r+").attrs["bench_data"] = {
            "version": DATA_VERSION, "pairs": n, "size": SIZE, "chunk": CHUNK, "seed": SEED}
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the floor


def _cut(region: np.ndarray) -> np.ndarray:
    """(1024, 1024) -> (16, 256, 256) tiles in raster order (a copy)."""
    h, w = region.shape
    return (region.reshape(h // TILE, TILE, w // TILE, TILE).swapaxes(1, 2)
            .reshape(-1, TILE, TILE).copy())


def floor_run(store: str, out: str, threads: int = 2) -> float:
    """The Welch core over every chunk of ``store``; kernels to ``out``. Returns seconds."""
    import zarr
    from threadpoolctl import threadpool_limits

    from pipeline.core.welch import welch_kernels

    t0 = time.perf_counter()
    g = zarr.open_group(store, mode="r")
    src, tgt = g["source"], g["target"]
    n, ny, nx = tgt.shape
    cy, cx = tgt.chunks[1:]
    by, bx = cy // TILE, cx // TILE
    kern = zarr.create_array(out, shape=(n, ny // TILE, nx // TILE, KERNEL, KERNEL),
                             chunks=(1, by, bx, KERNEL, KERNEL), dtype="float32", overwrite=True)
    jobs = [(i, y, x) for i in range(n) for y in range(ny // cy) for x in range(nx // cx)]

    def work(job):
        i, y, x = job
        ys, xs = slice(y * cy, (y + 1) * cy), slice(x * cx, (x + 1) * cx)
        res = welch_kernels(_cut(src[i, ys, xs]), _cut(tgt[i, ys, xs]), kernel_size=KERNEL)
        kern[i, y * by:(y + 1) * by, x * bx:(x + 1) * bx] = (
            res.kernels.reshape(by, bx, KERNEL, KERNEL).astype(np.float32))

    with threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, jobs))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- process memory / CPU


def _proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes; (0, 0) when the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        import psutil

        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return rss, hwm


def _proc_stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0, 0


def _reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class Poller(threading.Thread):
    """Peak RSS (and last CPU counters) of a set of processes, every ``interval`` s."""

    def __init__(self, pids, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pids_fn = pids if callable(pids) else (lambda: pids)
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.stat: dict[int, tuple[float, float, int]] = {}
        self._stop_event = threading.Event()

    def poll(self) -> None:
        for pid in self.pids_fn():
            rss, hwm = _proc_status(pid)
            if rss or hwm:
                self.peak[pid] = max(self.peak.get(pid, 0), rss, hwm)
                st = _proc_stat(pid)
                if st[0] or st[1]:
                    self.stat[pid] = st

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(self.interval)

    def stop(self) -> Poller:
        self._stop_event.set()
        self.join()
        self.poll()
        return self


def _cli_workers(pid: int) -> list[int]:
    """Worker processes (multiprocessing spawn children) below ``pid``."""
    import psutil

    out = []
    try:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                out.append(child.pid)
    except psutil.Error:
        pass
    return out


# --------------------------------------------------------------------------- helpers


def _mpix(pairs: int, seconds: float) -> float:
    return pairs * SIZE * SIZE / seconds / 1e6


def _job(store: Path, out: Path, method: str):
    from pipeline.job.config import job_from_dict

    return job_from_dict({
        "input": {"path": str(store)},
        "tiles": {"size": TILE},
        # the floor computes no diagnostics: neither do the Welch jobs compared with it
        "kernel": {"size": KERNEL, "method": method, **({"diagnostics": False} if method == "welch" else {})},
        "output": {"path": str(out), "mode": "overwrite"},
        "compute": {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1},
    })


class _Cmd:
    """A subprocess with its own memory poller."""

    def __init__(self, cmd: list[str], env: dict[str, str], workers: bool):
        self.cmd, self.env, self.workers = cmd, env, workers

    def run(self):
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=str(ROOT))
        poller = Poller((lambda: _cli_workers(proc.pid)) if self.workers else (lambda: [proc.pid]))
        poller.start()
        out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        poller.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
        return wall, out, poller


# --------------------------------------------------------------------------- the parts of one block


def profile_block(store: Path, tmp: Path, lstsq: bool) -> dict[str, float]:
    """Milliseconds per 1024x1024 block (16 tiles) of each step, one thread, image 0."""
    import zarr
    from threadpoolctl import threadpool_limits

    from pipeline import estimate_kernels
    from pipeline.core.welch import welch_kernels
    from pipeline.io.store import block_record
    from pipeline.job.blocks import BlockTask
    from pipeline.job.finish import ImageFinisher
    from pipeline.job.plan import plan_job

    out = tmp / "profile.zarr"
    floor_out = tmp / "profile-floor.zarr"
    shutil.rmtree(out, ignore_errors=True)
    ms: dict[str, float] = {}
    t = time.perf_counter()
    job = _job(store, out, "welch")
    plan = plan_job(job)
    ms["setup: plan_job (open inputs)"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    output = plan.output.create(plan.layout, plan.attributes())
    ms["setup: create output store (first use: imports xarray)"] = (time.perf_counter() - t) * 1e3
    task = BlockTask(plan.inputs.reader, plan.grid, job, output)
    kern = zarr.create_array(str(floor_out), shape=(1, 16, 16, KERNEL, KERNEL), chunks=(1, 4, 4, KERNEL, KERNEL),
                             dtype="float32", overwrite=True)
    g = zarr.open_group(str(store), mode="r")
    src_z, tgt_z = g["source"], g["target"]
    blocks = [b for b in plan.blocks if b.image == 0]
    acc = {k: 0.0 for k in ("read source+target chunks", "cut tiles", "welch core (floor)",
                            "estimate_kernels welch, diagnostics=False",
                            "estimate_kernels welch, diagnostics=True",
                            "write_block (kernel chunk + block record)", "floor write (kernel only)",
                            "whole pipeline task (BlockTask, diagnostics=False)")}
    with threadpool_limits(1):
        # warm-up
        s0 = _cut(src_z[0, :CHUNK, :CHUNK])
        estimate_kernels(s0, s0, kernel_size=KERNEL, method="welch", workers=1)
        for b in blocks:
            ys, xs = plan.grid.pixel_region(b)
            t = time.perf_counter()
            s, r = src_z[0, ys, xs], tgt_z[0, ys, xs]
            t1 = time.perf_counter()
            st, rt = _cut(s), _cut(r)
            t2 = time.perf_counter()
            core = welch_kernels(st, rt, kernel_size=KERNEL)
            t3 = time.perf_counter()
            estimate_kernels(st, rt, kernel_size=KERNEL, method="welch", workers=1, diagnostics=False)
            t4 = time.perf_counter()
            res = estimate_kernels(st, rt, kernel_size=KERNEL, method="welch", workers=1)
            t5 = time.perf_counter()
            record = block_record({**res.as_dict(), "quality_flag": res.flags}, (4, 4))
            output.write_block(b, res.kernels.reshape(4, 4, KERNEL, KERNEL), record)
            t6 = time.perf_counter()
            kern[0, b.ty0:b.ty1, b.tx0:b.tx1] = core.kernels.reshape(4, 4, KERNEL, KERNEL).astype(np.float32)
            t7 = time.perf_counter()
            task(b)
            t8 = time.perf_counter()
            for key, dt in zip(acc, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
                acc[key] += dt
        for key, v in acc.items():
            ms[key] = v / len(blocks) * 1e3
        if lstsq:
            ys, xs = plan.grid.pixel_region(blocks[5])
            st, rt = _cut(src_z[0, ys, xs]), _cut(tgt_z[0, ys, xs])
            for diag in (False, True):
                t = time.perf_counter()
                estimate_kernels(st, rt, kernel_size=KERNEL, workers=1, diagnostics=diag)
                ms[f"estimate_kernels lstsq, diagnostics={diag}"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    finisher = ImageFinisher(output, plan.grid, plan.layout.n_images, job.model)
    finisher.add_stored(blocks)  # image 0's blocks, read back from the store
    finisher.flush()
    ms["setup: finish one image (read its results, fit its model, write diagnostics and model)"] = (
        time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    output.mark_complete()
    ms["setup: mark_complete (consolidate)"] = (time.perf_counter() - t) * 1e3
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(floor_out, ignore_errors=True)
    return ms


# --------------------------------------------------------------------------- clusters


def start_cluster(worker_env: dict[str, str], env0: dict[str, str]):
    """A LocalCluster like ``pipeline.job.executors`` starts, with ``worker_env`` for its workers."""
    import dask
    from distributed import Client, LocalCluster

    # the nanny copies pre-spawn-environ into this process's environment (and an
    # existing variable beats the config): start from the clean one, restore after
    os.environ.clear()
    os.environ.update({k: v for k, v in env0.items() if k not in MALLOC or k in worker_env})
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "error"  # quiet workers (spawned with this environment)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": dict(worker_env)}):
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="auto",
                                   dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
        client.wait_for_workers(2)
    finally:
        os.environ.clear()
        os.environ.update(env0)
    seconds = time.perf_counter() - t0
    pids = list(client.run(os.getpid).values())
    seen = set(client.run(lambda: "/".join(os.environ.get(k, "unset") for k in MALLOC)).values())
    return cluster, client, pids, seconds, ",".join(sorted(seen))


def api_run(client, pids, job):
    """One run_job through ``client``: (seconds, peak RSS per worker, CPU delta, task stream summary)."""
    from distributed.utils import key_split

    from pipeline.job.run import run_job

    for pid in pids:
        _reset_hwm(pid)
    before = {pid: _proc_stat(pid) for pid in pids}
    poller = Poller(pids)
    poller.start()
    wall0 = time.time()
    t0 = time.perf_counter()
    # as_current: run_job's as_completed() looks up the default client, which a
    # client made with set_as_default=False (two clusters side by side) is not
    with client.as_current():
        run_job(job, progress=False, client=client, log=lambda _msg: None)
    seconds = time.perf_counter() - t0
    poller.stop()
    after = {pid: _proc_stat(pid) for pid in pids}
    cpu = {
        "user": sum(after[p][0] - before[p][0] for p in pids),
        "sys": sum(after[p][1] - before[p][1] for p in pids),
        "minflt": sum(after[p][2] - before[p][2] for p in pids),
    }
    stream = {"transfer_s": 0.0, "transfers": 0, "compute": {}}
    try:
        for task in client.get_task_stream(start=wall0):
            for ss in task.get("startstops", ()):
                dt = ss["stop"] - ss["start"]
                if ss["action"] == "transfer":
                    stream["transfer_s"] += dt
                    stream["transfers"] += 1
                elif ss["action"] == "compute":
                    name = key_split(task["key"])
                    stream["compute"][name] = stream["compute"].get(name, 0.0) + dt
    except Exception:  # the breakdown is optional
        pass
    return seconds, max(poller.peak.values(), default=0), cpu, stream


# --------------------------------------------------------------------------- against limit.py

W_CODEC, W_CHUNK = "blosczstd", 1024  # the floor's store: W_blosczstd_c1024.zarr
W_PAIRS = 4
#: the Welch jobs of the main table with ``kernel`` options turned off, by name
WELCH_OFF = {"welch-bare": ("diagnostics",), "welch-fast": ("diagnostics", "find_defects")}
TILES_PER_PAIR = (SIZE // TILE) ** 2
STACK_VERSION = 1


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def whole_process(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd`` to its end: (wall seconds, cores other processes used meanwhile, output).

    The process's own CPU time counts its waited-for descendants (the
    workers of ``kernelmap run``); the rest of the machine's busy time over
    the wall time is the load of other processes.
    """
    busy0, own0 = _machine_busy(), _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    other = max(0.0, (_machine_busy() - busy0 - (_children_cpu() - own0)) / wall)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return wall, other, proc.stdout


def ensure_w(limit: Path, work: Path, env: dict[str, str], log) -> Path:
    """The floor's store of workload W under ``work``: generated by its gen_data.py when missing."""
    import zarr

    store = work / f"W_{W_CODEC}_c{W_CHUNK}.zarr"

    def ready() -> bool:
        try:
            g = zarr.open_group(str(store), mode="r")
            return all(g[a].shape == (W_PAIRS, SIZE, SIZE) and g[a].chunks == (1, W_CHUNK, W_CHUNK)
                       for a in ("S", "R"))
        except Exception:  # missing or unreadable: regenerate
            return False

    if not ready():
        log(f"generating workload W under {work} with {limit.parent / 'gen_data.py'} (a few minutes, ~2.5 GB) ...")
        work.mkdir(parents=True, exist_ok=True)
        whole_process([sys.executable, str(limit.parent / "gen_data.py")], env, limit.parent)
        if not ready():
            raise RuntimeError(f"{store} is still not a store of {W_PAIRS} pairs of {SIZE}x{SIZE} after gen_data.py")
    return store


def stacked_w(w_store: Path, path: Path, copies: int, log) -> Path:
    """A stack of W's pairs ``copies`` times over (pair ``i`` is W's pair ``i % 4``), W's codecs and chunks."""
    import zarr

    n = W_PAIRS * copies
    stamp = {"version": STACK_VERSION, "from": str(w_store), "pairs": n}
    try:
        if zarr.open_group(str(path), mode="r").attrs.get("bench_stack") == stamp:
            return path
    except Exception:  # missing or unreadable: rewrite
        pass
    log(f"writing {path}: W's {W_PAIRS} pairs x {copies} ...")
    shutil.rmtree(path, ignore_errors=True)
    w = zarr.open_group(str(w_store), mode="r")
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name in ("S", "R"):
        src = w[name]
        dst = g.create_array(name, shape=(n, SIZE, SIZE), chunks=src.chunks, dtype=src.dtype,
                             compressors=src.compressors, filters=src.filters,
                             dimension_names=src.metadata.dimension_names, fill_value=src.fill_value)
        for p in range(W_PAIRS):
            pair = src[p]
            for c in range(copies):
                dst[c * W_PAIRS + p] = pair
    g.attrs["bench_stack"] = stamp
    return path


def _job_yaml(path: Path, store: Path, out: Path, method: str | None, model: str | None = None,
              off: tuple[str, ...] = ()) -> Path:
    """The default job on ``store`` (arrays S and R); ``method`` None keeps the default method, ``model``
    None the default model; ``off``: the ``kernel`` options turned off (``diagnostics``, ``find_defects``)."""
    options = ([f"method: {method}"] if method else []) + [f"{name}: false" for name in off]
    kernel = f"kernel: {{{', '.join(options)}}}\n" if options else ""
    kernel += f"model: {{method: {model}}}\n" if model else ""
    path.write_text(f"input: {{path: {store}, source: S, target: R}}\n{kernel}"
                    f"output: {{path: {out}, mode: overwrite}}\n")
    return path


def against_limit(args: argparse.Namespace, folder: Path, env0: dict[str, str], log) -> None:
    """The main table: whole processes, interleaved, on the same pairs (see the module docstring)."""
    from pipeline.core.estimate import DEFAULT_METHOD

    limit = Path(args.limit).resolve()
    if not limit.exists():
        raise SystemExit(f"{limit} not found: pass --limit PATH/TO/limit.py")
    work = Path(args.work).resolve()
    env = {**env0, "KERNELMAP_BENCH_WORK": str(work)}
    floor_env = {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    w_store = ensure_w(limit, work, floor_env, log)
    outs = folder / "outputs"
    outs.mkdir(parents=True, exist_ok=True)
    stack = folder / f"W{4 * W_PAIRS}.zarr"
    existed = stack.exists()
    sizes = {W_PAIRS: w_store, 4 * W_PAIRS: stacked_w(w_store, stack, 4, log)}
    kernelmap = str(Path(sys.executable).with_name("kernelmap"))
    if not Path(kernelmap).exists():
        kernelmap = shutil.which("kernelmap") or kernelmap
    # "kernels": the default job with the model fitted to the tile kernels instead of the default joint fit
    # "welch-bare": Welch with the tiles' diagnostics off, the configuration the floor's targets were set for
    # "welch-fast": the defect searches off as well
    methods = (("welch",) + (("welch-bare",) if args.welch_bare else ()) + (("welch-fast",) if args.welch_fast else ())
               + (() if args.skip_lstsq else (DEFAULT_METHOD,)) + (("kernels",) if args.joint else ()))
    runs: dict[tuple[int, str], list[tuple[float, float, str]]] = {}
    commands: dict[tuple[int, str], tuple[list[str], dict[str, str], Path]] = {}
    for n, store in sizes.items():
        commands[n, "limit"] = ([sys.executable, str(limit), "--threads", "2", "--backend", "pyfftw", "--store",
                                 f"{W_CODEC}:{W_CHUNK}", "--out", "--repeats", str(n // W_PAIRS)],
                                floor_env, limit.parent)
        for method in methods:
            job = _job_yaml(outs / f"job-{method}-{n}.yaml", store, outs / f"cli-{method}-{n}.zarr",
                            None if method in (DEFAULT_METHOD, "kernels") else "welch",
                            "kernels" if method == "kernels" else None, off=WELCH_OFF.get(method, ()))
            commands[n, method] = ([kernelmap, "run", str(job)], env, ROOT)
    order = [(n, what) for n in sizes for what in ("limit", *methods)]
    log(f"whole processes, interleaved, {args.rounds} round(s): " + ", ".join(f"{w} ({n} pairs)" for n, w in order))
    for r in range(args.rounds):
        for key in order:
            runs.setdefault(key, []).append(whole_process(*commands[key]))
            log(f"  round {r + 1}: {key[1]:6s} {key[0]:2d} pairs {runs[key][-1][0]:7.2f} s "
                f"(other processes {runs[key][-1][1]:.2f} cores)")

    def median(key: tuple[int, str]) -> float:
        return float(np.median([w for w, _, _ in runs[key]]))

    print()
    print(f"whole processes on the same pairs: {SIZE}x{SIZE} float32, Blosc-zstd chunks 1x{W_CHUNK}x{W_CHUNK}, "
          f"tiles {TILE}, kernel {KERNEL}; {args.rounds} round(s) interleaved; {os.cpu_count()} CPUs")
    print(f"limit.py: {limit} --threads 2 --backend pyfftw --store {W_CODEC}:{W_CHUNK} --out --repeats pairs/4; "
          "kernelmap: the default job (diagnostics and model on, local cluster 2 workers x 1 thread)")
    hdr = (f"{'pairs':>5} {'run':<31} {'median s':>8} {'[rounds]':<26} {'Mpix/s':>7} {'tiles/s':>8} "
           f"{'ratio':>6} {'r/round':>7} {'other':>5}  target")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        floor = median((n, "limit"))
        for what in ("limit", *methods):
            secs = median((n, what))
            walls = [w for w, _, _ in runs[n, what]]
            per_round = float(np.median([w / f for (w, _, _), (f, _, _) in zip(runs[n, what], runs[n, "limit"])]))
            other = float(np.median([o for _, o, _ in runs[n, what]]))
            mpix, tiles = n * SIZE * SIZE / secs / 1e6, n * TILES_PER_PAIR / secs
            target = ""
            if what in ("welch", *WELCH_OFF):
                ok = per_round <= 1.5 and secs / floor <= 1.5
                target = f"<= 1.5x floor{'' if n == 4 * W_PAIRS else ' (judged on 16 pairs)'}: " \
                         f"{'met' if ok else 'NOT met'}"
            elif what == DEFAULT_METHOD:
                ok = mpix >= 10.0 and secs / floor <= 3.5 and per_round <= 3.5
                target = f">= 10 Mpix/s (150 tiles/s) and <= 3.5x floor: {'met' if ok else 'NOT met'}"
            elif what == "kernels":
                added = median((n, DEFAULT_METHOD)) / secs - 1.0
                target = f"the default joint model adds {100 * added:+.0f} % to this job (<= 20 %): " \
                         f"{'met' if added <= 0.2 else 'NOT met'}"
            label = {"limit": "limit.py (the floor)", "welch": "kernelmap run, welch",
                     "welch-bare": "kernelmap run, welch, no diagn.",
                     "welch-fast": "kernelmap run, welch, no diag/def",
                     DEFAULT_METHOD: f"kernelmap run, {DEFAULT_METHOD} (default)",
                     "kernels": f"kernelmap run, {DEFAULT_METHOD}, model kernels"}[what]
            print(f"{n:5d} {label:<31} {secs:8.2f} {'[' + ', '.join(f'{w:.2f}' for w in walls) + ']':<26} "
                  f"{mpix:7.1f} {tiles:8.0f} {secs / floor:6.2f} {per_round:7.2f} {other:5.2f}  {target}")
    inner = []
    for n in sizes:
        for what in methods:
            found = [float(m.group(1)) for _, _, out in runs[n, what] for m in [re.search(r"in ([0-9.]+) s \(", out)]
                     if m]
            if found:
                inner.append(f"{what} {n} pairs {np.median(found):.2f} s")
        floor_in = [float(m.group(1)) for _, _, out in runs[n, "limit"]
                    for m in [re.search(r"median ([0-9.]+) s", out)] if m]
        if floor_in:
            inner.append(f"limit.py {n} pairs {np.median(floor_in) * (n // W_PAIRS):.2f} s "
                         f"({n // W_PAIRS} x its median repeat)")
    print("ratio: of the medians; r/round: median of the per-round ratios; other: cores other processes used "
          "meanwhile (median)")
    if inner:
        print("in-process parts (run_job as the command reports it; limit.py's compute repeats): " + "; ".join(inner))
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
        if not existed:
            shutil.rmtree(stack, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the whole-process table")
    p.add_argument("--quick", action="store_true", help="one round (and, with --details, one repeat each)")
    p.add_argument("--work", default=os.environ.get("KERNELMAP_BENCH_WORK", "/tmp/benchwork"),
                   help="limit.py's work folder (KERNELMAP_BENCH_WORK), where workload W is (or is generated)")
    p.add_argument("--limit", default=str(ROOT.parent / "shared" / "bench" / "limit.py"), help="the floor script")
    p.add_argument("--details", action="store_true",
                   help="also the in-process floor, run_job on running clusters, memory and the block profile")
    p.add_argument("--pairs-small", type=int, default=4, help="pairs of the API runs (a) and the memory check")
    p.add_argument("--pairs-large", type=int, default=16, help="pairs of the whole-command run (b)")
    p.add_argument("--dir", default="/tmp/kernelmap-bench", help="folder for the stacks and outputs")
    p.add_argument("--keep", action="store_true",
                   help="keep the stacks and outputs written by this run (stacks found are always kept)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the small-stack timings (best is shown)")
    p.add_argument("--repeats-large", type=int, default=2, help="repeats of the large-stack timings")
    p.add_argument("--joint", action="store_true",
                   help="also the default job with model.method: kernels, and what the default joint model adds")
    p.add_argument("--skip-lstsq", action="store_true", help="no runs of the default (lstsq) method (main table too)")
    p.add_argument("--welch-bare", action="store_true",
                   help="also Welch with the tiles' diagnostics off (kernel.diagnostics: false) in the main table")
    p.add_argument("--welch-fast", action="store_true",
                   help="also Welch with the diagnostics and the defect searches off in the main table")
    p.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.floor_only:
        seconds = floor_run(args.store, args.out)
        print(json.dumps({"seconds": seconds}))
        return 0
    if args.quick:
        args.rounds, args.repeats, args.repeats_large = 1, 1, 1
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    t_start = time.perf_counter()
    env0 = dict(os.environ)
    if any([env0.pop(k, None) is not None for k in MALLOC]):
        print(f"note: {' / '.join(MALLOC)} set in this shell: ignored (the worker environments set them)")
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    against_limit(args, folder, env0, log)
    if args.details:
        details(args, folder, env0, log)
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    return 0


def details(args: argparse.Namespace, folder: Path, env0: dict[str, str], log) -> None:
    """The in-process floor, run_job on running clusters, worker memory and the block profile."""
    t_start = time.perf_counter()
    small_n, large_n = args.pairs_small, args.pairs_large
    stores = {n: folder / f"pairs-{n}.zarr" for n in {small_n, large_n}}
    existed = {n: _store_ready(s, n) for n, s in stores.items()}
    gen_s = ensure_data(stores, log)
    if gen_s:
        log(f"data written in {gen_s:.1f} s")
    small = stores[small_n]
    outs = folder / "outputs"
    outs.mkdir(exist_ok=True)
    py = sys.executable
    floor_env = {**env0, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    kernelmap = str(Path(py).with_name("kernelmap"))
    if not Path(kernelmap).exists():
        kernelmap = shutil.which("kernelmap") or kernelmap

    notes = []

    # ---- where the time goes: one block, one thread
    log("profiling one image's 16 blocks (one thread) ...")
    prof = profile_block(small, outs, lstsq=not args.skip_lstsq)

    # ---- import costs
    def import_time(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([py, "-c", code], env=floor_env, check=True, cwd=str(ROOT))
        return time.perf_counter() - t

    imp_floor = import_time("import zarr, threadpoolctl, pipeline.core.welch")
    imp_cli = import_time("import pipeline.cli, pipeline.job.run, pipeline.job.config, distributed, xarray")

    # ---- (a) API with a running cluster, side by side with the in-process floor
    import pipeline.job.run as prun

    base_env = {k: str(v) for k, v in prun.WORKER_ENV.items() if k not in MALLOC}
    # unset: glibc's dynamic thresholds; 65536: dask's default trim; WORKER_ENV: the run's own
    variants = {
        "unset": base_env,
        "65536": {**base_env, TRIM: "65536"},
        "WORKER_ENV": {k: str(v) for k, v in prun.WORKER_ENV.items()},
    }
    lstsq_variants = ("unset", "WORKER_ENV")
    log(f"starting {len(variants)} LocalClusters (2 workers x 1 thread each), {' / '.join(MALLOC)}: "
        f"{' / '.join(variants)} ...")
    clusters = {}
    for name, env in variants.items():
        clusters[name] = start_cluster(env, env0)
    for name, (_, _, _, secs, seen) in clusters.items():
        notes.append(f"cluster start (malloc={name}; workers see {seen}): {secs:.1f} s")

    welch_small = _job(small, outs / "api-welch.zarr", "welch")
    # warm the workers (imports, FFT plans) once per cluster, untimed
    for name, (_, client, pids, _, _) in clusters.items():
        api_run(client, pids, _job(small, outs / f"warm-{name}.zarr", "welch"))
        shutil.rmtree(outs / f"warm-{name}.zarr", ignore_errors=True)
    floor_small, api = [], {name: [] for name in clusters}
    log(f"(a) floor vs run_job(client=...) on {small_n} pairs, {args.repeats} rounds ...")
    for _ in range(args.repeats):
        floor_small.append(floor_run(str(small), str(outs / "floor-small.zarr")))
        for name, (_, client, pids, _, _) in clusters.items():
            api[name].append(api_run(client, pids, welch_small))
    lstsq = {}
    if not args.skip_lstsq:
        log(f"(a) default method (lstsq) on {small_n} pairs, once per worker environment ...")
        for name in lstsq_variants:
            _, client, pids, _, _ = clusters[name]
            lstsq[name] = api_run(client, pids, _job(small, outs / "api-lstsq.zarr", "lstsq"))
    for cluster, client, *_ in clusters.values():
        client.close()
        cluster.close()
    os.environ.clear()
    os.environ.update(env0)

    # ---- (b) whole processes on the large stack (and the small one, for memory)
    log(f"(b) whole processes: floor and `kernelmap run` (welch), {large_n} and {small_n} pairs ...")
    job_files = {}
    for n, store in stores.items():
        jf = outs / f"job-{n}.yaml"
        jf.write_text(
            f"input: {{path: {store}}}\n"
            f"tiles: {{size: {TILE}}}\n"
            f"kernel: {{size: {KERNEL}, method: welch, diagnostics: false}}\n"
            f"output: {{path: {outs / f'cli-{n}.zarr'}, mode: overwrite}}\n"
            "compute: {scheduler: local, n_workers: 2, threads_per_worker: 1}\n"
        )
        job_files[n] = jf

    def floor_proc(n: int):
        return _Cmd([py, str(Path(__file__).resolve()), "--floor-only", "--store", str(stores[n]),
                     "--out", str(outs / f"floor-proc-{n}.zarr")], floor_env, workers=False).run()

    def cli(n: int):
        return _Cmd([kernelmap, "run", str(job_files[n])], env0, workers=True).run()

    fp = {n: [] for n in stores}
    cl = {n: [] for n in stores}
    for n, reps in ((large_n, args.repeats_large), (small_n, 1)):
        for _ in range(reps):
            fp[n].append(floor_proc(n))
            cl[n].append(cli(n))

    # ---- the table
    fl_s = min(floor_small)
    fl_proc = {n: min(r[0] for r in v) for n, v in fp.items()}
    print()
    print(f"kernelmap pipeline benchmark: {SIZE}x{SIZE} float32 pairs, Zarr Blosc-zstd chunks 1x{CHUNK}x{CHUNK}, "
          f"tiles {TILE}, kernel {KERNEL}; 2 workers x 1 thread vs floor 2 threads; {os.cpu_count()} CPUs")
    print(f"seconds = best of N (N in brackets); ratio = to the floor on the same pairs; "
          f"peak = largest worker RSS (MiB); malloc = the workers' {' / '.join(MALLOC)}")
    hdr = f"{'run':<50} {'pairs':>5} {'seconds':>12} {'Mpix/s':>7} {'ratio':>6} {'peak':>6}  target"
    print(hdr)
    print("-" * len(hdr))

    def row(label, pairs, secs, n, ratio=None, peak=None, target=""):
        r = f"{ratio:6.2f}" if ratio is not None else f"{'':>6}"
        pk = f"{peak / MiB:6.0f}" if peak else f"{'':>6}"
        print(f"{label:<50} {pairs:>5} {secs:8.2f} [{n}] {_mpix(pairs, secs):7.1f} {r} {pk}  {target}")

    row("floor in-process (welch core, 2 threads)", small_n, fl_s, len(floor_small),
        target=f"(all runs: {', '.join(f'{s:.2f}' for s in floor_small)})")
    for name, runs in api.items():
        best = min(r[0] for r in runs)
        ratio = best / fl_s
        peak = max(r[1] for r in runs)
        row(f"(a) run_job welch, client=, malloc={name}", small_n, best, len(runs), ratio, peak,
            f"<= 1.2x {'PASS' if ratio <= 1.2 else 'FAIL'}  (all runs: {', '.join(f'{r[0]:.2f}' for r in runs)})")
    for name, r in lstsq.items():
        row(f"(a) run_job lstsq (default), malloc={name}", small_n, r[0], 1, r[0] / fl_s, r[1],
            "(no target; ratio to the Welch floor)")
    for n in sorted(stores, reverse=True):
        fbest = fl_proc[n]
        in_process = min(json.loads(r[1].strip().splitlines()[-1])["seconds"] for r in fp[n])
        row("floor whole process (python ... --floor-only)", n, fbest, len(fp[n]),
            target=f"(in-process part {in_process:.2f} s)")
        cbest = min(r[0] for r in cl[n])
        ratio = cbest / fbest
        peak = max(max(r[2].peak.values(), default=0) for r in cl[n])
        target = f"<= 1.5x {'PASS' if ratio <= 1.5 else 'FAIL'}" if n == large_n else "(memory check)"
        inner = []
        for r in cl[n]:
            m = re.search(r"in ([0-9.]+) s \(", r[1])
            if m:
                inner.append(float(m.group(1)))
        if inner:
            target += f"  (run_job part {min(inner):.2f} s)"
        row("(b) kernelmap run welch (whole command)", n, cbest, len(cl[n]), ratio, peak, target)
    peak_small = max(max(r[2].peak.values(), default=0) for r in cl[small_n])
    peak_large = max(max(r[2].peak.values(), default=0) for r in cl[large_n])
    api_peak = max([r[1] for runs in api.values() for r in runs] + [r[1] for r in lstsq.values()])
    overall = max(peak_small, peak_large, api_peak)
    independent = peak_large <= 1.10 * peak_small
    verdict = "PASS" if overall < GB and independent else "FAIL"
    print(f"peak worker RSS, whole command: {peak_small / MiB:.0f} MiB ({small_n} pairs) vs {peak_large / MiB:.0f} MiB "
          f"({large_n} pairs); all runs max {overall / MiB:.0f} MiB; target < 1 GB and <= 10 % growth: {verdict}")

    # ---- where the time goes
    print()
    print("one block = 16 tiles of 256x256 (one 1024x1024 chunk of source and target), one thread, ms per block:")
    for key, v in prof.items():
        if not key.startswith("setup"):
            print(f"  {key:<55} {v:8.1f}")
    core = prof["welch core (floor)"]
    pipe = prof["whole pipeline task (BlockTask, diagnostics=False)"]
    floor_blk = (prof["read source+target chunks"] + prof["cut tiles"] + core + prof["floor write (kernel only)"])
    diag = (prof["estimate_kernels welch, diagnostics=True"]
            - prof["estimate_kernels welch, diagnostics=False"])
    print(f"  => floor block {floor_blk:.1f} ms, pipeline task {pipe:.1f} ms ({pipe / floor_blk:.2f}x); "
          f"kernel.diagnostics (residual, noise, snr) would add {diag:.1f} ms")
    if "estimate_kernels lstsq, diagnostics=True" in prof:
        a, b = prof["estimate_kernels lstsq, diagnostics=False"], prof["estimate_kernels lstsq, diagnostics=True"]
        share = f"{100 * (b - a) / b:.0f} %" if b > a else "no measurable share"
        print(f"  lstsq: diagnostics {b - a:.0f} ms of {b:.0f} ms per block ({share}; one block, noisy)")
    print("set-up, ms: " + ", ".join(f"{k[7:]} {v:.0f}" for k, v in prof.items() if k.startswith("setup")))
    print(f"process start + imports, s: floor {imp_floor:.2f}, kernelmap/distributed/xarray {imp_cli:.2f}; "
          + "; ".join(notes))
    for name, runs in api.items():
        best = min(runs, key=lambda r: r[0])
        secs, _, cpu, stream = best
        comp = stream["compute"]
        busy = sum(comp.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(comp.items(), key=lambda kv: -kv[1])[:4])
        print(f"(a) welch malloc={name}: workers user {cpu['user']:.2f} s + sys {cpu['sys']:.2f} s, "
              f"{cpu['minflt'] / 1e3:.0f}k minor faults; task compute {busy:.2f} s over 2 workers x {secs:.2f} s "
              f"({100 * busy / (2 * secs):.0f} % busy) [{parts}]; transfers {stream['transfers']} "
              f"({stream['transfer_s']:.2f} s)")
    for name, r in lstsq.items():
        secs, _, cpu, stream = r
        print(f"(a) lstsq malloc={name}: workers user {cpu['user']:.2f} s + sys {cpu['sys']:.2f} s, "
              f"{cpu['minflt'] / 1e3:.0f}k minor faults, peak {r[1] / MiB:.0f} MiB")
    print(f"details: {time.perf_counter() - t_start:.0f} s"
          + (f" (data generation {gen_s:.0f} s)" if gen_s else " (data reused)"))

    # ---- clean up
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
        for n, s in stores.items():
            if not existed[n]:
                shutil.rmtree(s, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
