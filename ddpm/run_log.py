"""What a training run shows its user: the progress bar, TensorBoard, the loss CSV and the loss plot.

Only rank 0 makes one. The history of logged scalars lives in the checkpoint, so the CSV and plot
written after a resume are exactly those of an uninterrupted run.
"""
import csv
import io
import os

import numpy as np

from utils import atomic_write

COLUMNS = ("step", "loss", "lr", "grad_norm", "img_per_s")


def smooth(values, fraction=0.05):
    """A centred moving average: each point is the mean of the points within a window of about `fraction`
    of the curve (at least 5 points) around it, narrower near the ends so that the window stays centred.
    Unlike an exponential average it does not lag: on a falling loss curve an EMA lies above the data."""
    values = np.asarray(values, dtype=np.float64)
    half = max(2, int(len(values) * fraction / 2))
    sums = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    width = np.minimum(np.minimum(i, len(values) - 1 - i), half)  # shrinks to 0 at the two ends
    return (sums[i + width + 1] - sums[i - width]) / (2 * width + 1)


class RunLog:
    def __init__(self, results_dir: str, start_step: int, max_steps: int, history: dict | None,
                 loss_label: str = "loss (L_simple)"):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.dir, self.loss_label = results_dir, loss_label
        self.history = history or {k: [] for k in COLUMNS}
        # purge_step drops events a killed run wrote after its last checkpoint, so curves do not overlap
        self.tb = SummaryWriter(os.path.join(results_dir, "logs"), purge_step=start_step or None)
        self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, desc="train")

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
        """The loss CSV and the loss-curve PNG (raw and smoothed, log y), both written atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(COLUMNS)
        writer.writerows(zip(*(self.history[k] for k in COLUMNS)))
        atomic_write(os.path.join(self.dir, "plots", "losses.csv"), lambda f: f.write(buf.getvalue().encode()))
        self.tb.flush()
        if not self.history["step"]:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.history["step"], self.history["loss"], alpha=0.35, label="loss")
        ax.plot(self.history["step"], smooth(self.history["loss"]), label="smoothed (centred window)")
        ax.set(xlabel="step", ylabel=self.loss_label, yscale="log", title=os.path.basename(self.dir))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(os.path.join(self.dir, "plots", "loss.png"), lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
