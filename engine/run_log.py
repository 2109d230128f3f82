"""The run's log (rank 0 only): progress bar, ``metrics.jsonl``, ``val.jsonl``, TensorBoard.

``RUN/metrics.jsonl`` has one JSON object per logged step with at least

    step               optimizer steps done (1-based: the object for step s is logged after step s)
    loss               total loss = contrastive + localization_weight * localization
    loss_contrastive   InfoNCE over the global batch (identical on every rank)
    loss_localization  mean over the ranks of their local localization losses
    lr                 learning rate of the visual group (the textual group is lr_text)
    images_per_s       images through the optimizer per second, all ranks, since the last object
    global_batch       world size x micro-batch: the contrastive batch, i.e. every image is scored
                       against global_batch captions (global_batch - 1 negatives)
    images_per_step    global_batch x gradient accumulation: images per optimizer step
    skipped_images     unreadable images replaced by the next narrative so far, all ranks (counted
                       since this process started; DESIGN §2.2)
    skipped_steps      optimizer steps whose update was skipped because a loss or gradient was
                       NaN/inf (counted since this process started); more than
                       train.max_skipped_steps of them in a row stop the run (fp16's loss-scale
                       overflows, with a finite loss, are counted but do not stop it)
    peak_gpu_mem_mb    the most CUDA memory any rank's tensors held so far (MiB); null on CPU

Losses are averaged over the steps since the previous object (and the accumulation micro-steps),
leaving out skipped steps; null when every step since the previous object was skipped.
On resume the objects after the checkpoint's step are dropped from the file, so that it reads as
one uninterrupted history. Validation results go to ``RUN/val.jsonl`` (see ``engine/validate.py``).

The progress bar (rich) shows step, ETA, images/s, the losses and the lr on a terminal; when the
output is not a terminal (logs, CI) each logged step is printed as one plain line instead.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the objects of ``path`` whose ``step`` is <= ``max_step`` (after a resume)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a kill
    path.write_text("".join(k + "\n" for k in kept))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class _Tensorboard:
    def __init__(self, log_dir: Path):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def image(self, tag: str, png_path: Path, step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image
        with Image.open(png_path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogger:
    """Rank 0's logger; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str | Path, rank: int, max_steps: int, start_step: int,
                 global_batch: int, images_per_step: int):
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.max_steps, self.start_step = max_steps, start_step
        self.global_batch, self.images_per_step = global_batch, images_per_step
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._progress = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.val_path = self.run_dir / "val.jsonl"
        truncate_jsonl(self.path, start_step)
        truncate_jsonl(self.val_path, start_step)
        self.tb = _Tensorboard(self.run_dir / "tensorboard")
        self.console = Console(file=sys.stdout)
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step,
                                                 info="")
            self._progress.start()

    def step_done(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, values: dict) -> dict:
        """Write one object for ``step``; ``values`` holds the averaged losses and the lr."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        steps = step - self._last_step
        ips = steps * self.images_per_step / max(now - self._last_time, 1e-9) if steps else 0.0
        self._last_time, self._last_step = now, step
        record = {"step": step, **values, "images_per_s": round(ips, 2),
                  "global_batch": self.global_batch, "images_per_step": self.images_per_step,
                  "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tb.scalars("train", record, step)
        info = (f"{ips:7.1f} img/s  loss {_fmt(values['loss'])}  "
                f"con {_fmt(values['loss_contrastive'])}  loc {_fmt(values['loss_localization'])}  "
                f"lr {values['lr']:.2e}")
        if values.get("skipped_steps"):
            info += f"  skipped steps {values['skipped_steps']}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        else:
            print(f"step {step}/{self.max_steps}  {info}", flush=True)
        return record

    def log_val(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.val_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tb.scalars("val", record, step)
        self.message("val step %d: %s" % (step, "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())))

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.enabled:
            self.tb.image(tag, png, step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self.tb.close()
