"""The progress of a long loop: tqdm's bar on a terminal; in a log file (stderr not a terminal, as in a cluster job
or `python train.py > log.txt 2>&1`) a plain line every PLAIN_EVERY seconds and one at the end instead, since
tqdm's redraws would fill it (about 80 bytes a step: 65 MB for the paper's 800k steps).

    with progress(n, "sampling", "img") as bar:
        bar.update(k)
        bar.set_postfix(loss="0.0312")   # shown on the bar, or at the end of the next plain line
        bar.set_description("round 2/3")  # a new name in front of the bar or of the next plain lines
        bar.write("a message")           # on stdout, between the bar's redraws
"""
import sys
from time import monotonic

from tqdm import tqdm

PLAIN_EVERY = 10.0  # seconds between two plain lines


def progress(total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False):
    """A progress bar over `total` units: tqdm where stderr is a terminal, else a PlainProgress (the same methods:
    update, set_postfix, set_description, write, close, n, and `with`)."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, initial, disable)


def clock(seconds: float) -> str:
    """Seconds as m:ss or h:mm:ss."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class PlainProgress:
    """A line on stderr such as 'train: 350/700 it (50%), 1:24 elapsed, 4.17 it/s, 1:24 left, loss=0.0312', at
    most one every `every` seconds (written when update is called) and one at close."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 every: float = PLAIN_EVERY):
        self.total, self.desc, self.unit, self.disable, self.every = total, desc, unit, disable, every
        self.n = self.first = self.shown = initial
        self.started = self.last = monotonic()
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        if monotonic() - self.last >= self.every:
            self.show()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        print(text, flush=True)

    def show(self) -> None:
        now = monotonic()
        self.last, self.shown = now, self.n
        if self.disable:
            return
        elapsed = now - self.started
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {clock(elapsed)} elapsed, {rate:.3g} {self.unit}/s"
        if rate > 0 and self.total and self.n < self.total:
            line += f", {clock((self.total - self.n) / rate)} left"
        print(line + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n != self.shown:
            self.show()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
