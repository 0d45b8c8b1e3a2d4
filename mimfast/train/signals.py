"""Preemption-safe stopping: SIGTERM / SIGINT / SIGUSR1 ask the run to checkpoint and stop at the next step boundary.

Cluster schedulers send SIGTERM (Slurm, Kubernetes, torchrun's agent) or SIGUSR1 (Slurm's ``--signal``, before a
time limit) some seconds before they kill a job; Ctrl-C sends SIGINT. While :class:`StopSignals` is active the first
such signal only sets a flag (nothing is interrupted mid-step, mid-collective or mid-write). The loop reads the flag
at every step boundary through the same all-reduce that carries the loss, so every rank sees the request of any rank
at the same step, writes the final checkpoint collectively and raises :class:`TrainingInterrupted`. A second signal
exits at once: the default action of that signal, without a checkpoint (an atomic checkpoint write that was in flight
leaves only a ``*.tmp`` file, removed at the next start).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


class TrainingInterrupted(Exception):
    """A stop signal arrived; the run wrote a final checkpoint at a step boundary (``checkpoint``) and stopped."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, out_dir: str):
        self.signum, self.step, self.checkpoint, self.out_dir = signum, step, checkpoint, out_dir
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"
        where = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint written"
        self.summary = f"stopped by {signal.Signals(signum).name} at step {step}: {where}"
        super().__init__(f"{self.summary}; resume with train.resume=auto (--resume auto) in train.out_dir={out_dir}")


class StopSignals:
    """Context manager: while active, the first stop signal sets :attr:`signum`; a second one exits at once.

    Outside the main thread (where Python cannot install handlers) it does nothing and :attr:`signum` stays None.
    The previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler may run while print() holds the stream's lock
            os.write(2, f"\nmimfast: {name} received: writing a checkpoint at the end of this step, then stopping "
                        f"(send it again to exit at once, without a checkpoint)\n".encode())  # fmt: skip
            return
        os.write(2, f"\nmimfast: second {name}: exiting now, without a checkpoint\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._saved.clear()
