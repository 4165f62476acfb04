"""Progress of long work: a live bar on a terminal, a few plain lines everywhere else.

On a terminal, :class:`Progress` is a tqdm bar with rate, ETA and live metrics. When the stream is
not a terminal (a log file, CI, ``nohup``), redrawn bars would become thousands of lines, so it
prints one plain line each time another ``every`` fraction of the work is done (and one at the
end): ``meta-train: 300/600 it (50%), 2.41 it/s, 2m04s elapsed, ETA 2m04s, loss 0.512, score 0.873``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _amount(value: float, unit: str) -> str:
    return f"{value / 1e6:.1f} MB" if unit == "B" else f"{value:g} {unit}"


class Progress:
    """``total`` units of work from ``initial``; ``update(n)`` as they are done, ``metrics({...})``
    for the live values shown beside the bar (or in the next plain line), ``close()`` at the end.
    ``enabled=False`` prints nothing."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        leave: bool = True,
        every: float = 0.1,
        stream: IO[str] | None = None,
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = self.start = initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.values: dict[str, str] = {}
        interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                leave=leave,
                file=self.stream,
                unit_scale=unit == "B",
            )
            if interactive
            else None
        )
        self.clock = time.perf_counter()
        self.printed = initial
        self.next_line = self._next_mark(initial)

    def _next_mark(self, done: int) -> float:
        step = max(self.every * self.total, 1)
        return (int(done / step) + 1) * step

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done >= self.next_line:
            self._line()

    def metrics(self, values: dict[str, Any]) -> None:
        self.values = {k: (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.values)

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.clock
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        percent = 100 * self.done / self.total if self.total else 100.0
        parts = [
            f"{self.desc}: {_amount(self.done, self.unit) if self.unit == 'B' else self.done}/"
            f"{_amount(self.total, self.unit)} ({percent:.0f}%)"
        ]
        if self.unit != "B":
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.done < self.total and eta == eta:
            parts.append(f"ETA {_duration(eta)}")
        parts += [f"{k} {v}" for k, v in self.values.items()]
        print(", ".join(parts), file=self.stream, flush=True)
        self.printed = self.done
        self.next_line = self._next_mark(self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.printed != self.done:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
