"""Progress of a long loop, in the form that suits where it runs.

One policy for every long run (train-prior, solve's flow / Langevin / NUTS, calibrate, bench,
train-posterior, the reference scripts):

- stderr is a terminal: a tqdm bar;
- stderr is not a terminal (a log file, ``nohup``, CI, a batch system): a plain line when the loop has advanced
  ``LINE_FRACTION`` of its total since the last line (at least ``LINE_MIN_S`` seconds apart), or ``LINE_MAX_S``
  seconds have passed, and one closing line for a loop that ran that long; a short loop stays silent;
- ``enabled=False`` (the commands' ``--quiet``): nothing.

The environment variable ``GANFLOW_PROGRESS`` (``bar``, ``lines`` or ``off``) overrides the choice.
A line reads ``flow 1/2: 600/2000 (30 %), 12 s, ETA 28 s, elbo=-5.19``: the step, the time, the estimated time
left and the figure that matters for the loop (``set_postfix``). With ``announce_after_s``, a long loop also says
once, that long after it started and in any mode but ``off``, how fast it runs here and when it will end:
``train-prior: 3.3 step/s here; 2000 steps take ~10 min`` (what a user needs to decide whether to wait).

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(100, "demo", stream=out, mode="lines", min_interval_s=0) as bar:
    ...     for _ in range(100):
    ...         bar.update(1)
    >>> len(out.getvalue().splitlines()) <= 11
    True
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "progress_mode", "format_duration", "LINE_FRACTION", "LINE_MIN_S", "LINE_MAX_S"]

LINE_FRACTION = 0.1  # a plain line every 10 % of the loop ...
LINE_MIN_S = 5.0  # ... but not more often than this (a fast loop writes a few lines, a 5-s loop none)
LINE_MAX_S = 30.0  # a line at least this often while a slow loop runs

_MODES = ("bar", "lines", "off")


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"2.5 h"``: a duration as a person reads an estimate.

    Example:
        >>> format_duration(45), format_duration(720), format_duration(9000)
        ('45 s', '12 min', '2.5 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_mode(enabled: bool = True, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for ``stream`` (default stderr): see the module docstring."""
    if not enabled:
        return "off"
    forced = os.environ.get("GANFLOW_PROGRESS", "").strip().lower()
    if forced in _MODES:
        return forced
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    """A progress report for a loop of ``total`` steps (``None``: unknown), with the tqdm-like methods
    ``update``, ``set_postfix`` and ``close`` (also a context manager).

    Args:
        total: steps the loop will take at most.
        desc: what runs (``"flow 1/2"``, ``"nuts chain 3/4"``).
        enabled: False shows nothing (``--quiet``).
        initial: steps already done (a resumed run).
        unit: tqdm's unit.
        stream: where to write (default stderr).
        mode: ``"bar"``, ``"lines"`` or ``"off"``; default `progress_mode`.
        min_interval_s, max_interval_s, fraction: the plain-line policy (`LINE_MIN_S`, `LINE_MAX_S`,
            `LINE_FRACTION`).
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = "it",
                 stream: TextIO | None = None, mode: str | None = None, min_interval_s: float = LINE_MIN_S,
                 max_interval_s: float = LINE_MAX_S, fraction: float = LINE_FRACTION,
                 announce_after_s: float | None = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self._announce_after_s = announce_after_s
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode or progress_mode(enabled, self.stream)
        self.min_interval_s, self.max_interval_s, self.fraction = min_interval_s, max_interval_s, fraction
        self.postfix: dict[str, Any] = {}
        self._initial, self._t0 = initial, time.monotonic()
        self._t_line, self._n_line, self._lines = self._t0, initial, 0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.n += n
        if self._announce_after_s is not None and self.mode != "off":
            self._maybe_announce(time.monotonic())
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self._line_due(time.monotonic()):
            self._write_line()

    def set_postfix(self, **figures: Any) -> None:
        """The figures that matter (``elbo=-5.19``), shown on the bar or the next line."""
        self.postfix = figures
        if self._bar is not None:
            self._bar.set_postfix(figures, refresh=False)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        """End the report: a closing line for a loop that ran long enough to have shown one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and (self._lines or time.monotonic() - self._t0 >= self.min_interval_s):
            if self.n != self._n_line or not self._lines:
                self._write_line(done=True)
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _maybe_announce(self, now: float) -> None:
        """Once, ``announce_after_s`` into the loop: the rate here and the expected time of the whole loop."""
        elapsed, done = now - self._t0, self.n - self._initial
        if elapsed < self._announce_after_s or done <= 0 or not self.total:
            return
        self._announce_after_s = None
        rate = done / elapsed
        left = (self.total - self.n) / rate
        msg = (f"{self.desc}: {rate:.3g} {self.unit}/s here; {self.total - self._initial} {self.unit}s take "
               f"~{format_duration(elapsed + left)} (~{format_duration(left)} left)")
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def _line_due(self, now: float) -> bool:
        since = now - self._t_line
        if since >= self.max_interval_s:
            return True
        if since < self.min_interval_s or not self.total:
            return False
        return (self.n - self._n_line) >= self.fraction * self.total

    def _write_line(self, done: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._t0
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}",
                 f"{elapsed:.0f} s"]
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        if not done and self.total and rate > 0:
            parts.append(f"ETA {(self.total - self.n) / rate:.0f} s")
        if done:
            parts.append("done")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(f"{self.desc}: " + ", ".join(parts), file=self.stream, flush=True)
        self._t_line, self._n_line = now, self.n
        self._lines += 1
