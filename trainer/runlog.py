"""The run's side effects in one object: progress bar, log lines, results.csv, TensorBoard, batch
plots and image-weighting records. Built with `enabled=False` on non-zero ranks, where every method
does nothing, so the loop never checks ranks itself.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from trainer import plots

log = logging.getLogger("trainer")

TRAIN_HEADER = ("Epoch", "gpu_mem", "box", "obj", "cls", "total", "targets", "img_size")
CSV_COLUMNS = ("epoch", "box", "obj", "cls", "total", "precision", "recall", "map50", "map",
               "val_box", "val_obj", "val_cls", "lr0", "lr1", "lr2", "train_s", "val_s")
PLOTTED_BATCHES = 3
PROGRESS_VAR = "KFYOLO_PROGRESS"  # a file to append one line per epoch to (see RunLogger._progress)


def _memory_string(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G"
    return "0G"  # the column is about accelerator memory; CPU runs report none


class RunLogger:
    def __init__(self, run_dir: Path, names: Sequence[str], enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.names = list(names)
        self.enabled = enabled
        self._tb = None
        self._plotter: ThreadPoolExecutor | None = None
        self._plots: list[Future] = []
        self._closing = False
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir))

    # progress -------------------------------------------------------------------------------
    def progress(self, loader: Iterable, total: int, initial: int = 0) -> Iterable:
        """Wrap the batch iterator in a tqdm bar on the main process (`initial`: batches already
        trained before a resume)."""
        if not self.enabled:
            return loader
        log.info(("\n" + "%10s" * len(TRAIN_HEADER)) % TRAIN_HEADER)
        # In pod logs and CI (no terminal) a redraw per batch floods the log; update twice a minute.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        return tqdm(loader, total=total, initial=initial, bar_format="{l_bar}{bar:10}{r_bar}", mininterval=interval)

    def batch(self, bar: Any, epoch: int, epochs: int, mloss: torch.Tensor, n_targets: int, img_size: int,
              device: torch.device) -> None:
        if self.enabled and isinstance(bar, tqdm):
            # refresh=False: let tqdm's mininterval decide when to redraw
            bar.set_description(("%10s" * 2 + "%10.4g" * 6) % (
                f"{epoch}/{epochs - 1}", _memory_string(device), *mloss.tolist(), n_targets, img_size), refresh=False)

    def train_batch_images(self, ni: int, epoch: int, imgs: torch.Tensor, targets: torch.Tensor,
                           paths: Sequence[str]) -> None:
        """The first batches of the run, as train_batch{ni}.jpg and TensorBoard images. Drawn on a
        background thread (about a second each at 640 px), off the training step."""
        if not self.enabled or ni >= PLOTTED_BATCHES:
            return
        batch = (imgs.detach().cpu().clone(), targets.detach().cpu().clone(), list(paths))
        self._in_background(self._plot_batch, ni, epoch, *batch)

    def _in_background(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._plotter is None:
            self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
        self._plots.append(self._plotter.submit(fn, *args))

    def _plot_batch(self, ni: int, epoch: int, imgs: torch.Tensor, targets: torch.Tensor, paths: list[str]) -> None:
        image = plots.plot_images(imgs, targets, paths, self.names, self.run_dir / f"train_batch{ni}.jpg")
        if self._tb is not None:
            self._tb.add_image(f"train_batch{ni}", image, global_step=epoch, dataformats="HWC")

    def wait_for_plots(self) -> None:
        """Block until the queued plots are written; a failed plot is logged, not raised."""
        for future in self._plots:
            try:
                future.result()
            except Exception as e:  # a plot must never end a training run
                log.warning("a plot failed: %s", e)
        self._plots.clear()

    # epochs ---------------------------------------------------------------------------------
    def epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        """Append one results.csv row, TensorBoard scalars, and a summary line."""
        if not self.enabled:
            return
        self.wait_for_plots()  # the epoch's files are complete before anything uploads them
        path = self.run_dir / "results.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(CSV_COLUMNS)
            writer.writerow([epoch] + [f"{row.get(c, float('nan')):.6g}" for c in CSV_COLUMNS[1:]])
        if self._tb is not None:
            for key in CSV_COLUMNS[1:]:
                value = row.get(key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(_tb_tag(key), value, epoch)
            self._tb.flush()
        if "map" in row:
            log.info("epoch %d: P %.3f R %.3f mAP@.5 %.3f mAP@.5:.95 %.3f", epoch, row["precision"], row["recall"],
                     row["map50"], row["map"])
        else:
            log.info("epoch %d: total loss %.4f (not validated this epoch; see --val-every)", epoch, row.get("total", float("nan")))
        self._progress(epoch, row)

    def forget_from(self, epoch: int) -> None:
        """Resuming at `epoch`: drop the results.csv rows and image_weights.jsonl records of that
        epoch and later ones, which the run will write again. They exist when a run ended before
        its checkpoint held them: killed after an epoch's row while its checkpoint was being
        written, or stopped inside an epoch whose record was written when it began."""
        if not self.enabled:
            return

        def keep_csv(line: str) -> bool:
            head = line.split(",", 1)[0]
            return not head.isdigit() or int(head) < epoch

        def keep_json(line: str) -> bool:
            try:
                return int(json.loads(line)["epoch"]) < epoch
            except (ValueError, KeyError, TypeError):
                return True

        for name, keep in (("results.csv", keep_csv), ("image_weights.jsonl", keep_json)):
            path = self.run_dir / name
            if not path.is_file():
                continue
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.strip() or keep(line)]
            if len(kept) < len(lines):
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)
                log.info("%s: dropped %d row(s) of epoch %d and later, which this resume trains again",
                         name, len(lines) - len(kept), epoch)

    def _progress(self, epoch: int, row: dict[str, float]) -> None:
        """One line per epoch appended to $KFYOLO_PROGRESS when set: `make demo`'s runner
        (pipelines/__main__.py) tails that file, because kfp.local shows a step's output only once
        the step has ended."""
        target = os.environ.get(PROGRESS_VAR)
        if not target:
            return
        metrics = f"  mAP@.5 {row['map50']:.3f}  mAP@.5:.95 {row['map']:.3f}" if "map" in row else ""
        line = (f"epoch {epoch}: box {row.get('box', float('nan')):.4f}  obj {row.get('obj', float('nan')):.4f}  "
                f"cls {row.get('cls', float('nan')):.4f}{metrics}  ({row.get('train_s', 0) + row.get('val_s', 0):.0f} s)")
        try:
            with open(target, "a") as f:
                f.write(line + "\n")
        except OSError as e:  # progress is a courtesy: never fail training over it
            log.debug("cannot append to %s: %s", target, e)

    def image_weights(self, record: dict[str, Any]) -> None:
        """One JSON line per epoch: class weights used and how often each class was drawn."""
        if not self.enabled:
            return
        with (self.run_dir / "image_weights.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, count in zip(self.names, record["class_draws"]):
                self._tb.add_scalar(f"image_weights/draws/{name}", count, record["epoch"])

    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.warning(message, *args)

    def start_closing(self, results_plot: bool = True) -> None:
        """Close TensorBoard and start drawing results.png on the plot thread, so that the caller
        can leave its process group meanwhile (trainer/distributed.py's cleanup waits 0.2 s);
        close() waits for it. Without `results_plot` an earlier results.png (a previous block's)
        is removed instead: it would show fewer epochs than results.csv."""
        if self._closing:
            return
        self._closing = True
        self.wait_for_plots()  # the batch plots write to TensorBoard
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self.enabled:
            return
        csv_path = self.run_dir / "results.csv"
        if not results_plot:
            (self.run_dir / "results.png").unlink(missing_ok=True)
        elif csv_path.exists():
            self._in_background(plots.plot_results_csv, csv_path)

    def close(self) -> None:
        self.start_closing()
        self.wait_for_plots()
        if self._plotter is not None:
            self._plotter.shutdown()
            self._plotter = None


def _tb_tag(key: str) -> str:
    if key in ("box", "obj", "cls", "total"):
        return f"train/{key}_loss"
    if key == "val_s":
        return "time/val_epoch_s"
    if key.startswith("val_"):
        return f"val/{key[4:]}_loss"
    if key.startswith("lr"):
        return f"lr/pg{key[2:]}"
    if key == "train_s":
        return "time/train_epoch_s"
    return f"metrics/{key}"


def run_cli(main: Callable[[], int]) -> None:
    """A training, evaluation or prediction CLI's `__main__`: the process owns its allocator, so
    freed activations are reused (trainer/memory.py); then main runs and the process exits with
    its status, skipping the interpreter's teardown (exit_now)."""
    from trainer.memory import keep_freed_memory

    keep_freed_memory()
    exit_now(main())


def exit_now(code: int) -> None:
    """End a CLI process whose work is done and whose files are closed, skipping the interpreter's
    teardown: with torch, torchvision and dynamo loaded, that takes about a second of freeing
    module objects one by one, in every rank of every block. Logs and stdio are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)
