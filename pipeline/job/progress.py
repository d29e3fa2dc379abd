"""The progress of a run: a bar on a terminal, plain periodic lines otherwise (batch logs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: a time left, rounded to what a reader needs."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts computed tiles (or other units, ``unit``) out of ``total``; draws a bar on a terminal (standard
    error), or logs a line every ``interval`` seconds and at the end, with the rate and the time left at that
    rate.  Silent unless ``enabled``."""

    def __init__(self, total: int, log: Callable[[str], None], enabled: bool, interval: float = 10.0,
                 unit: str = "tiles"):
        self.total, self.log, self.enabled, self.interval, self.unit = total, log, enabled, interval, unit
        self.done = 0
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, tiles: int) -> None:
        """Count ``tiles`` more tiles (units) done."""
        self.done += tiles
        if not self.enabled:
            return
        now = time.monotonic()
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.start, 1e-9)
        finished = self.done >= self.total
        left = "done" if finished else f"{duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        if self.tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.unit} {rate:6.1f}/s {left:<16}")
            sys.stderr.flush()
            if finished:
                sys.stderr.write("\n")
        elif now - self.last >= self.interval or finished:
            self.last = now
            self.log(f"progress: {self.done}/{self.total} {self.unit} ({100 * frac:.0f} %), {rate:.1f} {self.unit}/s"
                     + (f", {left}" if left and not finished else ""))
