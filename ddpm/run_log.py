"""What a training run shows its user: the progress bar (plain lines in a log file), TensorBoard, the loss CSV and
the loss plot.

Only rank 0 makes one. The history of logged scalars lives in the checkpoint, so the CSV and plot
written after a resume are exactly those of an uninterrupted run.
"""
import csv
import io
import os

import numpy as np

from ddpm.progress import progress
from utils import atomic_write

COLUMNS = ("step", "loss", "lr", "grad_norm", "img_per_s")
# fewer logged points are drawn as they are: a window of 5 would span a tenth of the curve or more, and averaging
# a steep, convex start over it lifts the curve above its points (the quickstart logs 14)
MIN_POINTS_TO_SMOOTH = 50


def smooth(values, fraction=0.05):
    """A centred moving average in log space: each point is the geometric mean of the points within a window of
    about `fraction` of the curve (at least 5 points) around it, narrower near the ends so that the window stays
    centred. Unlike an exponential average it does not lag (on a falling loss curve an EMA lies above the data),
    and in log space, the plot's, an exponential decay is a straight line, which it keeps exactly; the values'
    own average would lie above a convex curve."""
    logs = np.log(np.asarray(values, dtype=np.float64))
    half = max(2, int(len(logs) * fraction / 2))
    sums = np.concatenate([[0.0], np.cumsum(logs)])
    i = np.arange(len(logs))
    width = np.minimum(np.minimum(i, len(logs) - 1 - i), half)  # shrinks to 0 at the two ends
    return np.exp((sums[i + width + 1] - sums[i - width]) / (2 * width + 1))


def plain_decimal(value: float, axis) -> str:
    """A tick label of a log axis in plain decimals (0.2, not 2x10^-1): every tick where the axis spans at most a
    decade; else the powers of ten, and their multiples by 2, 3 and 5 up to 2 decades, by 2 and 5 up to 3."""
    low, high = sorted(axis.get_view_interval())
    if value <= 0 or low <= 0:
        return ""
    decades = np.log10(high / low)
    mantissa = round(value / 10 ** np.floor(np.log10(value) + 1e-9), 6)
    if decades <= 1 or mantissa == 1 or mantissa in ((2, 3, 5) if decades <= 2 else (2, 5) if decades <= 3 else ()):
        return np.format_float_positional(value, precision=6, trim="-")
    return ""


def loss_figure(history: dict, title: str, ylabel: str = "loss (L_simple)"):
    """The loss curve on a log axis labelled in plain decimals: the logged points, and from MIN_POINTS_TO_SMOOTH
    points on their centred moving average (smooth). A matplotlib Figure with an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps, loss = history["step"], history["loss"]
    if len(loss) >= MIN_POINTS_TO_SMOOTH:
        ax.plot(steps, loss, alpha=0.35, label="loss")
        ax.plot(steps, smooth(loss), label="smoothed (centred window, log space)")
    else:
        ax.plot(steps, loss, marker=".", label=f"loss (fewer than {MIN_POINTS_TO_SMOOTH} points: not smoothed)")
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda value, pos: plain_decimal(value, ax.yaxis)))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


class RunLog:
    def __init__(self, results_dir: str, start_step: int, max_steps: int, history: dict | None,
                 loss_label: str = "loss (L_simple)"):
        from torch.utils.tensorboard import SummaryWriter
        self.dir, self.loss_label = results_dir, loss_label
        self.history = history or {k: [] for k in COLUMNS}
        # purge_step drops events a killed run wrote after its last checkpoint, so curves do not overlap
        self.tb = SummaryWriter(os.path.join(results_dir, "logs"), purge_step=start_step or None)
        self.bar = progress(max_steps, "train", "step", initial=start_step)

    def scalars(self, step: int, loss: float, lr: float, grad_norm: float, img_per_s: float) -> None:
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, img_per_s=img_per_s)
        for k, v in row.items():
            self.history[k].append(v)
        for k in ("loss", "lr", "grad_norm", "img_per_s"):
            self.tb.add_scalar(f"train/{k}", row[k], step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}")  # mean since the last log

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def image(self, tag: str, grid_hwc, step: int) -> None:
        self.tb.add_image(tag, grid_hwc, step, dataformats="HWC")

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def write_files(self) -> None:
        """The loss CSV and the loss-curve PNG (loss_figure), both written atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(COLUMNS)
        writer.writerows(zip(*(self.history[k] for k in COLUMNS)))
        atomic_write(os.path.join(self.dir, "plots", "losses.csv"), lambda f: f.write(buf.getvalue().encode()))
        self.tb.flush()
        if not self.history["step"]:
            return
        fig = loss_figure(self.history, os.path.basename(self.dir), self.loss_label)
        atomic_write(os.path.join(self.dir, "plots", "loss.png"), lambda f: fig.savefig(f, format="png", dpi=100))

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
