"""Rank 0's progress output: permanent progress lines on stdout and, on a terminal, a live bar on stderr.

The lines (every ``train.log_every`` steps) are what logs, ``torchrun`` and cluster schedulers keep. The bar is
redrawn in place (``\\r``, at most ``max_hz`` times a second) between them and erased before each line, so a
terminal shows both without interleaving: ``step 1234/2790 [#######.......] 44% | loss 0.2450 | lr 4.1e-03 |
 812 img/s | mfu n/a | 1:23<1:45``.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """``M:SS`` or ``H:MM:SS``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressBar:
    """Step progress with throughput and time left.

    Args:
        start: the step the run starts from (0, or the resumed step).
        stop: the last step this run will reach.
        live: draw the in-place bar (on ``stream``); False keeps only :meth:`line` output.
        stream: where the bar goes (stderr: stdout stays a clean log).
        width: bar cells.
        max_hz: redraws per second at most (the last step is always drawn).
    """

    def __init__(
        self,
        start: int,
        stop: int,
        *,
        live: bool,
        stream: TextIO | None = None,
        width: int = 24,
        max_hz: float = 8.0,
    ):
        self.start, self.stop, self.live = start, stop, live
        self.stream = stream if stream is not None else sys.stderr
        self.width, self.min_dt = width, 1.0 / max_hz
        self.t0 = time.perf_counter()
        self.t_first: float | None = None  # end of the first step: start-up and compilation are not in the rate
        self.step_first = self.step = start
        self.last_draw = 0.0
        self.drawn = False
        self.text = ""

    @staticmethod
    def wanted(mode: str, stream: TextIO | None = None) -> bool:
        """Whether ``train.progress=mode`` asks for the live bar (``auto``: when ``stream`` is a terminal)."""
        if mode == "bar":
            return True
        if mode == "lines":
            return False
        stream = stream if stream is not None else sys.stderr
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False

    def steps_per_sec(self, step: int | None = None, now: float | None = None) -> float | None:
        """Mean rate since the end of the first step (start-up excluded); None before a second step."""
        now = time.perf_counter() if now is None else now
        step = self.step if step is None else step
        if self.t_first is None or step <= self.step_first or now <= self.t_first:
            return None
        return (step - self.step_first) / (now - self.t_first)

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds to ``stop`` at :meth:`steps_per_sec` (None before two steps)."""
        rate = self.steps_per_sec(step, now)
        return None if rate is None else (self.stop - step) / rate

    def elapsed(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self.t0

    def update(self, step: int, loss: float | None, lr: float, ips: float | None, mfu: float | None) -> None:
        """After each optimizer step: record timing and redraw the bar (throttled)."""
        now = time.perf_counter()
        self.step = step
        if self.t_first is None:
            self.t_first, self.step_first = now, step
        if not self.live or (now - self.last_draw < self.min_dt and step < self.stop):
            return
        done = (step - self.start) / max(1, self.stop - self.start)
        filled = min(self.width, int(done * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        shown = "nan" if loss is None else f"{loss:.4f}"
        rate = "?" if ips is None else f"{ips:,.0f}"
        util = "n/a" if mfu is None else f"{mfu:.1%}"
        self.text = (
            f"step {step}/{self.stop} [{bar}] {done:4.0%} | loss {shown} | lr {lr:.2e} | {rate} img/s | "
            f"mfu {util} | {format_duration(self.elapsed(now))}<{format_duration(self.eta(step, now))}"
        )
        self.stream.write("\r\x1b[K" + self.text)
        self.stream.flush()
        self.last_draw, self.drawn = now, True

    def _erase(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def line(self, msg: str) -> None:
        """A permanent line on stdout; the bar is erased first and redrawn after."""
        self._erase()
        print(msg, flush=True)
        if self.drawn:
            self.stream.write(self.text)
            self.stream.flush()

    def close(self) -> None:
        """Erase the bar (the final progress line and the summary say the rest)."""
        self._erase()
        self.drawn = False
