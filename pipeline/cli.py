"""The ``kernelmap`` command: ``run``, ``submit``, ``config``, ``report``, ``compare``, ``apply``, ``ingest``
and ``demo``."""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import KernelmapError, OptionError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that keeps the arguments it was given (for :class:`_SetAction`'s messages)."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)


class _SetAction(argparse.Action):
    """``--set KEY=VALUE``, collected in order; refused at once (usage, exit status 2) without its ``=``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if "=" not in values:
            parser.error(f"{option_string} {values}: expected KEY=VALUE (e.g. {option_string} {values}="
                         f"{_example_value(getattr(parser, 'given', []), option_string, values)})")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


def _example_value(given: Sequence[str], option: str | None, key: str) -> str:
    """The argument after ``--set KEY`` where it looks like KEY's value (``--set tiles.size 128``), else
    ``VALUE``."""
    for i, arg in enumerate(given):
        after = (i + 2 if arg == option and given[i + 1:i + 2] == [key] else i + 1 if arg == f"{option}={key}"
                 else None)
        if after is not None and after < len(given):
            value = given[after]
            if not value.startswith("--") and "=" not in value and not value.endswith((".yaml", ".yml")):
                return value
    return "VALUE"


def _add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action=_SetAction, default=[], metavar="KEY=VALUE", help=help)


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML)")
    _add_set_argument(parser, "override a job setting, e.g. --set tiles.size=512 (value parsed as YAML; beats the "
                              "file; may repeat)")


def _version() -> str:
    """The installed distribution's version (the package's own where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kernelmap")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kernelmap", description="Kernel maps between image stacks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run a job",
        description="Run a job. Exit status: 0 done; 2 the job was refused (bad job file, inputs or options; "
                    "nothing is started); 3 done and the output complete, but every tile of some image is "
                    "unusable (flagged no_data or no_signal): stderr names the images, the flags and the "
                    "option to change; 1 stopped by a full disk or an exhausted quota (free space, then resume with "
                    "--set output.mode=resume); 130 interrupted (resume with --set output.mode=resume).")
    _add_job_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.add_argument("--performance-report", metavar="FILE.html", help="write Dask's performance report")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    config = sub.add_parser("config", help="print the effective configuration with all defaults")
    _add_job_arguments(config)
    submit = sub.add_parser("submit", help="submit the whole job as one batch job (Slurm, PBS or SGE)")
    _add_job_arguments(submit)
    for flag, key, what in (("--system", "compute.scheduler", "batch system: slurm, pbs or sge"),
                            ("--queue", "compute.batch.queue", "queue (partition)"),
                            ("--account", "compute.batch.account", "account (project)"),
                            ("--walltime", "compute.batch.walltime", "time limit, e.g. 02:00:00"),
                            ("--cores", "compute.batch.cores", "CPUs of the allocation (one worker each)"),
                            ("--memory", "compute.batch.memory", "memory of the allocation, e.g. 16GB")):
        submit.add_argument(flag, dest=key, metavar=flag[2:].upper(), help=f"{what} (sets {key})",
                            type=int if flag == "--cores" else str)
    submit.add_argument("--print", action="store_true", help="print the batch script and exit; submit nothing")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end; exit with its status")
    report = sub.add_parser("report", help="figures and an index.html of a kernel map")
    report.add_argument("store", help="kernel-map store written by kernelmap run")
    report.add_argument("--out", help="folder or fsspec URL prefix (s3://bucket/report) for the figures, tables and "
                                      "index.html (default: STORE.report; give it for a STORE at a URL)")
    report.add_argument("--max-images", type=int, default=8,
                        help="images given panels: the outliers (most deviant first), then the first ones")
    report.add_argument("--rows", type=int, default=100,
                        help="rows of the image table on the page (all of them in images.csv and pages)")
    report.add_argument("--coords", metavar="FILE.csv",
                        help="per-image values to trend against (time, airmass, filter...): a CSV table whose "
                             "'image' column holds the store's image labels")
    report.add_argument("--overwrite", action="store_true",
                        help="replace the report already in --out (a folder that is not a report is refused)")
    report.add_argument("--stretch", choices=("linear", "asinh", "log"), default="asinh",
                        help="colour stretch of the kernel mosaics (default: asinh, linear near zero and "
                             "logarithmic above 1 %% of the peak, so the wings and the ringing show; log: 4 decades "
                             "below the peak)")
    report.add_argument("--scale", choices=("shared", "per-image"), default="shared",
                        help="colour scale of the per-image maps and kernel mosaics: one shared by the images "
                             "(default), or each image its own (per-image: the variation within each image shows)")
    report.add_argument("--storage-options", metavar="JSON",
                        help="fsspec options for the URLs among STORE, --out and --coords, e.g. "
                             "'{\"anon\": true}'; default: credentials from the environment (nothing of them "
                             "is written)")
    compare = sub.add_parser("compare", help="per-tile differences B - A of two kernel maps")
    compare.add_argument("a", help="kernel map A")
    compare.add_argument("b", help="kernel map B")
    compare.add_argument("--out", default="kernelmap-compare", help="folder for compare.zarr and compare.png")
    apply = sub.add_parser(
        "apply", help="matched and difference images of a kernel map's pairs",
        description="Convolve the sharper image of each pair with its image's kernel-field model (the kernel "
                    "of each pixel) and write the matched image, the background and the difference to a Zarr "
                    "store: target - matched - background where the kernels are forward (the source convolved), "
                    "matched - source - background where they are reversed (the target convolved; the store's "
                    "direction says which); an interrupted apply is finished with --resume. Exit status: 0 done; "
                    "2 refused (nothing written).")
    apply.add_argument("store", help="kernel-map store written by kernelmap run")
    apply.add_argument("--out", required=True, help="Zarr store for the images (refused if it exists, unless "
                                                    "--overwrite or --resume)")
    again = apply.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace an existing --out store")
    again.add_argument("--resume", action="store_true",
                       help="finish an interrupted apply: the images --out records as complete are kept, the others "
                            "written (refused, naming what differs, where --out was made from another kernel map "
                            "or with another --chunk); starts one where --out does not exist")
    apply.add_argument("--chunk", type=int, default=1024, help="side of the chunks computed and stored")
    apply.add_argument("--storage-options", metavar="JSON",
                       help="fsspec options for the input store (a kernel map keeps none of their values), e.g. "
                            "'{\"anon\": true}'; default: credentials from the environment")
    apply.add_argument("--fits", metavar="DIR", help="also write each difference image as DIR/<image>.diff.fits "
                                                     "(with the reference's WCS where the stack has one)")
    ingest = sub.add_parser(
        "ingest", help="FITS files to an input stack (Zarr) for kernelmap run",
        usage="kernelmap ingest (REF TARGET... | --pairs SRC TGT [SRC TGT ...] | --sources SRC... --targets "
              "TGT...) --out STACK [options]",
        description="Read FITS images (plain or tile-compressed), a reference shared by every target (REF "
                    "TARGET...) or a source per target (--pairs, or --sources and --targets matched in order), "
                    "and write the input stack kernelmap run reads: source, target, an optional mask, variances "
                    "from weight or variance planes, header keys as coordinates. Every image must be on the "
                    "pixel grid of the reference (or of the first source), or is resampled onto it with "
                    "--reproject. Every file's headers are checked before anything is written; the images are "
                    "then written in parallel. Running the same ingest again finishes an interrupted one. Exit "
                    "status: 0 done; 2 refused: a problem found in the files' headers or the options is refused "
                    "before anything is written, while a value found while reading an image's pixels (e.g. a "
                    "negative variance) stops the ingest with status 2 after the stack is created: the images "
                    "written before are recorded, and running the same ingest again once the file is fixed writes "
                    "the rest.")
    ingest.add_argument("files", nargs="*", metavar="REF TARGET",
                        help="the reference (source) FITS file, then the target FITS files or glob patterns "
                             "(quoted)")
    ingest.add_argument("--pairs", nargs="+", metavar="SRC TGT",
                        help="pairs of a source and its target FITS file: SRC1 TGT1 SRC2 TGT2 ... (instead of REF "
                             "TARGET...)")
    ingest.add_argument("--sources", nargs="+", metavar="SRC",
                        help="a source per target: FITS files or glob patterns (quoted), matched in order to "
                             "--targets, as many files as they")
    ingest.add_argument("--targets", nargs="+", metavar="TGT",
                        help="target FITS files or glob patterns (quoted), with --sources (or after REF)")
    ingest.add_argument("--out", required=True,
                        help="Zarr store for the stack (refused if it exists, unless it is this same ingest's: "
                             "then it is finished)")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing --out store")
    ingest.add_argument("--hdu", default="0", help="the image HDU: an index or a name (default 0)")
    ingest.add_argument("--mask-hdu", help="the mask HDU (index or name; of --mask-file where given) of the targets, "
                                           "and of the reference (or each source) where it has one; nonzero = bad")
    ingest.add_argument("--mask-file", metavar="TEMPLATE",
                        help="masks in other files, from each image's path (the reference's where that file "
                             "exists): {dir}, {name}, {stem} (e.g. '{dir}/{stem}.mask.fits')")
    ingest.add_argument("--mask-bits", type=int, help="the mask bits that mark a bad pixel (default: any)")
    ingest.add_argument("--weight-hdu", help="the HDU of weights, inverse variances (0 = no data), in each image's "
                                             "file or --weight-file")
    ingest.add_argument("--weight-file", metavar="TEMPLATE",
                        help="weights in other files, from each image's path (e.g. '{dir}/{stem}.weight.fits')")
    ingest.add_argument("--variance-hdu", help="the HDU of variances (0, NaN or inf = no data), in each image's file "
                                               "or --variance-file")
    ingest.add_argument("--variance-file", metavar="TEMPLATE", help="variances in other files, from each image's "
                                                                    "path")
    ingest.add_argument("--no-reference-noise", action="store_true",
                        help="the reference (or the sources) has no weights or variances (only the targets')")
    ingest.add_argument("--keys", default="", help="header keys to keep as coordinates, comma-separated "
                                                   "(e.g. MJD-OBS,FILTER,AIRMASS)")
    ingest.add_argument("--tolerance", type=float, default=0.01,
                        help="how far (pixels) an image's grid may lie from the reference's (or the first "
                             "source's)")
    ingest.add_argument("--reproject", action="store_true",
                        help="resample images off the reference's (or the first source's) grid onto it (bicubic; "
                             "masks grown, variances interpolated) instead of refusing them")
    ingest.add_argument("--chunk", type=int, default=1024, help="side of the stack's chunks (default 1024)")
    ingest.add_argument("--workers", type=int, default=4, help="images read and written at once (threads; "
                                                               "default 4)")
    ingest.add_argument("--quiet", action="store_true", help="no progress output")
    demo = sub.add_parser("demo", help="write the built-in demo stack, run the demo job, summarise")
    demo.add_argument("--dir", default="demo-output", help="folder for the demo stack and result")
    demo.add_argument("--images", type=int, default=3, help="epochs in the demo stack")
    demo.add_argument("--size", type=int, default=768, help="image side in pixels")
    _add_set_argument(demo, "override a setting of the demo job, e.g. --set tiles.size=256 (may repeat)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .job.config import load_job
    from .job.run import EXIT_UNUSABLE, plan_job, run_job

    job = load_job(args.job, args.overrides)
    if args.dry_run:
        if job.ingest is not None:
            from .job.ingest import job_ingest_plan

            ingest = job_ingest_plan(job)  # every file's headers checked
            if not ingest.complete:
                first = (job.ingest.reference if job.ingest.sources is None else
                         f"{len(job.ingest.sources)} source file pattern(s)")
                print(f"{ingest.describe()}: to be written from {first} and "
                      f"{len(job.ingest.targets)} target file pattern(s) first; the rest of the plan reads that "
                      "stack (kernelmap ingest writes it alone)")
                return 0
        print(plan_job(job).describe())
        return 0
    summary = run_job(job, progress=not args.quiet, performance_report=args.performance_report)
    if summary.unusable_images:  # after the output is written: it stays complete and inspectable
        print(f"kernelmap run: {summary.unusable_report()}", file=sys.stderr)
        return EXIT_UNUSABLE
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .job.config import load_job
    from .job.submit import submission_script, submit_job, wait_for_job

    # flag values are text as given (quoted for the YAML parser: 2:00:00 stays 2:00:00)
    flags = [f"{key}={json.dumps(value)}" for key, value in vars(args).items()
             if key.startswith("compute.") and value is not None]
    job = load_job(args.job, [*args.overrides, *flags])
    if args.print:
        sys.stdout.write(submission_script(job))
        return 0
    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    submission = submit_job(job, log=note)
    print(submission.job_id, flush=True)  # alone on stdout: JOB=$(kernelmap submit job.yaml)
    return wait_for_job(submission, log=note) if args.wait else 0


def _storage_options(text: str | None) -> dict | None:
    """``--storage-options JSON`` as a mapping (``None`` where not given)."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--storage-options is not JSON ({exc}): give a JSON object, e.g. "
                          "'{\"anon\": true}'") from None
    if not isinstance(options, dict):
        raise OptionError("--storage-options must be a JSON object (key: value pairs)")
    return options


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import write_report

    index = write_report(args.store, args.out, max_images=args.max_images, rows=args.rows,
                         coordinates=args.coords, storage_options=_storage_options(args.storage_options),
                         overwrite=args.overwrite, notify=lambda text: print(f"note: {text}", file=sys.stderr),
                         stretch=args.stretch, scale=args.scale)
    print(f"report: {index}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import xarray as xr

    from .analysis.compare import summary_lines, write_comparison

    store, figure = write_comparison(args.a, args.b, args.out)  # refuses maps without a tile in common
    for line in summary_lines(xr.open_zarr(store)):
        print(line)
    print(f"differences: {store}; figure: {figure}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .job.apply import apply_kernel_map

    options = _storage_options(args.storage_options)
    mode = "overwrite" if args.overwrite else "resume" if args.resume else "create"
    summary = apply_kernel_map(args.store, args.out, mode=mode, chunk=args.chunk, fits=args.fits,
                               storage_options=options)
    kept = f"; {len(summary.kept)} already complete" if summary.kept else ""
    turned = (f"; {len(summary.reversed)} reversed, their target convolved: difference = kernel * target - source "
              "- background" if summary.reversed else "")
    print(f"images: {summary.path} (arrays matched, difference, background; {len(summary.images)} image(s){kept}"
          f"{turned})")
    return 0


_INGEST_FORMS = ("kernelmap ingest REF TARGET... (one reference for every target), or pairs: --pairs SRC1 TGT1 "
                 "SRC2 TGT2 ..., or --sources 'src/*.fits' --targets 'tgt/*.fits' (matched in order)")


def _ingest_files(args: argparse.Namespace) -> tuple[str | None, list[str] | None, list[str]]:
    """``(reference, sources, targets)`` of ``kernelmap ingest``'s arguments (a reference or sources).

    Raises
    ------
    OptionError
        The files are given in none or more than one of the forms, or ``--pairs`` has a source without
        its target.
    """
    files, pairs, sources, targets = args.files, args.pairs, args.sources, args.targets
    if pairs is not None:
        if files or sources is not None or targets is not None:
            given = files[0] if files else "--sources" if sources is not None else "--targets"
            raise OptionError(f"--pairs gives the sources and the targets, and {given} is given too: give them "
                              f"in one form: {_INGEST_FORMS}")
        if len(pairs) % 2:
            raise OptionError(f"--pairs takes a source and a target file for each pair (SRC1 TGT1 SRC2 TGT2 ...): "
                              f"{len(pairs)} files are given, the last, {pairs[-1]}, without its target: give "
                              "each source's target after it")
        return None, pairs[0::2], pairs[1::2]
    if sources is not None:
        if files:
            raise OptionError(f"a reference ({files[0]}) and --sources are both given: give one reference shared "
                              f"by every target, or a source per target, not both: {_INGEST_FORMS}")
        if targets is None:
            raise OptionError("--sources needs --targets, one target per source, matched in order (e.g. "
                              "--sources 'src/*.fits' --targets 'tgt/*.fits'; files after --sources are sources)")
        return None, sources, targets
    targets = files[1:] + (targets or [])
    if not files or not targets:
        raise OptionError(f"give the files: {_INGEST_FORMS}")
    return files[0], None, targets


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .job.ingest import ingest_fits

    def hdu(value: str | None) -> int | str | None:
        return int(value) if value is not None and value.lstrip("-").isdigit() else value

    if args.workers < 1:
        raise OptionError(f"--workers {args.workers}: give at least 1")
    reference, sources, targets = _ingest_files(args)
    options = {"mask_hdu": hdu(args.mask_hdu), "mask_file": args.mask_file, "mask_bits": args.mask_bits,
               "weight_hdu": hdu(args.weight_hdu), "weight_file": args.weight_file,
               "variance_hdu": hdu(args.variance_hdu), "variance_file": args.variance_file, "sources": sources}
    ingest_fits(reference, targets, args.out, hdu=hdu(args.hdu),
                keys=[k.strip() for k in args.keys.split(",") if k.strip()], tolerance=args.tolerance,
                reproject=args.reproject, reference_noise=not args.no_reference_noise, chunk=args.chunk,
                mode="overwrite" if args.overwrite else "create", workers=args.workers, progress=not args.quiet,
                **{key: value for key, value in options.items() if value is not None})
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .job.config import dump_job, load_job

    sys.stdout.write(dump_job(load_job(args.job, args.overrides)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .job.run import run_job
    from .sim.demo import demo_job, summarise_demo, write_demo_stack

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    job = demo_job(folder, args.overrides)
    print(f"writing the demo stack ({args.images} epochs of {args.size}x{args.size} px) to {job.input.path}")
    truth = write_demo_stack(job.input.path, n_images=args.images, size=args.size,
                             kernel_size=job.kernel.size, overwrite=True)
    summary = run_job(job)
    print(summarise_demo(summary.open_dataset(), truth))
    from .analysis.report import write_report

    print(f"report (open it in a browser): {write_report(summary.path, folder / 'report', overwrite=True)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kernelmap`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    handlers = {"run": _cmd_run, "config": _cmd_config, "submit": _cmd_submit, "report": _cmd_report,
                "compare": _cmd_compare, "apply": _cmd_apply, "ingest": _cmd_ingest, "demo": _cmd_demo}
    hook = sys.unraisablehook
    sys.unraisablehook = anyway = _InterruptAnyway(hook)
    tornado_log = logging.getLogger("tornado.application")
    tornado_log.addFilter(_interrupted_sync)
    try:
        return handlers[args.command](args)
    except KernelmapError as exc:
        print(f"kernelmap {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {_RESUME_HINTS.get(args.command, 'nothing is finished: run it again')}", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk, here or in a worker's task: what to do, not a traceback
        full = no_space(exc)
        if full is None:
            raise
        print(f"kernelmap {args.command}: {os.strerror(full.errno).lower()} writing {_written(args)}: free space, then "
              f"{_after_full_disk(args)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        tornado_log.removeFilter(_interrupted_sync)
        anyway.cancel()
        # as the command (not called with arguments, as by a program): what the async storage clients leave
        # in coroutines collected at exit is no more the user's business than during the command
        sys.unraisablehook = hook if argv is not None else _DropCoroutineGarbage(hook)


class _InterruptAnyway:
    """``sys.unraisablehook`` while a command runs: Ctrl-C that fell inside a finaliser or a weakref callback,
    where Python would print it and carry on, interrupts the command all the same (SIGINT again, to the main
    thread, a moment later: once out of that callback); the rest goes to the hook it replaces.  ``cancel``:
    no SIGINT sent after the command."""

    def __init__(self, hook: Callable[[Any], object]) -> None:
        self.hook = hook
        self.timers: list[threading.Timer] = []

    def __call__(self, unraisable: Any) -> None:
        if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
            if not inspect.iscoroutine(unraisable.object):  # see _DropCoroutineGarbage
                self.hook(unraisable)
            return
        timer = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()


def _interrupted_sync(record: logging.LogRecord) -> bool:
    """Drop distributed's own error when Ctrl-C cuts its ``sync`` call short (its ``cancel`` callback then
    reads a variable not yet set); every other record passes."""
    return not (record.exc_info and record.exc_info[0] is NameError
                and "sync.<locals>.cancel" in str(record.getMessage()))


class _DropCoroutineGarbage:
    """``sys.unraisablehook`` that drops the exceptions left in coroutines collected unawaited (the async
    storage clients' requests abandoned once one failed: an unreachable object store answers each of them
    with its own traceback after the one line that says what to do); the rest goes to ``hook``."""

    def __init__(self, hook: Callable[[Any], object]) -> None:
        self.hook = hook

    def __call__(self, unraisable: Any) -> None:
        if not inspect.iscoroutine(unraisable.object):
            self.hook(unraisable)


#: Exit status of a command stopped by an error it names (such as a full disk) after it began writing.
EXIT_FAILED = 1


def no_space(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk or an exhausted quota (``ENOSPC``, ``EDQUOT``) that ``exc`` is or arose
    from (its causes and contexts), else ``None``."""
    full = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in full:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _written(args: argparse.Namespace) -> str:
    """What the command writes (where a full disk stopped it)."""
    if args.command in ("run", "submit"):
        from .job.config import load_job

        return load_job(args.job, args.overrides).output.path  # as it loaded before
    if args.command == "report":
        return args.out or f"{args.store}.report"
    return args.dir if args.command == "demo" else args.out


def _after_full_disk(args: argparse.Namespace) -> str:
    """How to finish a command that a full disk stopped: as an interrupted one, except a run's output whose
    creation was cut short (it holds no block records to resume from): removed first."""
    if args.command == "run":
        from .io.store import OutputStore

        store = OutputStore(_written(args))
        try:
            if store.exists():
                store.completed_blocks()  # raises where it holds no block records
        except Exception:
            return f"remove {store.path} (its creation was cut short) and run the job again"
    return _RESUME_HINTS.get(args.command, "run it again")


#: How each command that writes is finished after it was interrupted.
_RESUME_HINTS = {
    "run": "run the job again with output.mode=resume (--set output.mode=resume) to finish it",
    "demo": "run the demo again",
    "submit": "submit the job again with output.mode=resume to finish it",
    "apply": "run the same kernelmap apply again with --resume to finish it",
    "ingest": "run the same kernelmap ingest again to finish it",
    "report": "run kernelmap report again with --overwrite",
    "compare": "run kernelmap compare again",
}


if __name__ == "__main__":
    sys.exit(main())
