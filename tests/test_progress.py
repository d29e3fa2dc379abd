"""What a run says while it goes: done, rate and the time left at that rate."""

from __future__ import annotations

import pytest

from pipeline.job import progress as progress_module
from pipeline.job.progress import Progress, duration


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (41.6, "42 s"), (59.4, "59 s"), (60, "1 min 00 s"),
                                               (185, "3 min 05 s"), (3599, "59 min 59 s"),
                                               (7620, "2 h 07 min"), (-3, "0 s")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert duration(seconds) == text


def test_the_periodic_lines_give_the_time_left_at_the_rate_so_far(monkeypatch):
    clock = iter([100.0, 110.0, 130.0, 160.0])  # start, then each update
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    bar = Progress(100, lines.append, enabled=True, interval=5.0)
    bar.tty = False
    bar.update(10)  # 10 tiles in 10 s: 90 left at 1/s
    bar.update(20)  # 30 in 30 s: 70 left
    bar.update(70)  # done
    assert lines == ["progress: 10/100 tiles (10 %), 1.0 tiles/s, 1 min 30 s left",
                     "progress: 30/100 tiles (30 %), 1.0 tiles/s, 1 min 10 s left",
                     "progress: 100/100 tiles (100 %), 1.7 tiles/s"]
