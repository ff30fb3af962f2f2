"""Run configuration: hyperparameters and options as frozen dataclasses.

Both load from YAML plus command-line overrides, are written into the run folder (`hyp.yaml`,
`opt.yaml`) and into every checkpoint, and are passed explicitly to whatever needs them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trainer.data.image_cache import CACHE_MODES
from trainer.data.samplers import SAMPLERS, SamplerConfig
from trainer.storage import S3Uri, StorageError, is_s3


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Hyp:
    """Training hyperparameters (see trainer/cfg/hyps/hyp.scratch.yaml for what each means)."""

    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    box: float = 0.05
    cls: float = 0.5
    cls_pw: float = 1.0
    obj: float = 1.0
    obj_pw: float = 1.0
    iou_t: float = 0.20
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_hyp_value(f.name, getattr(self, f.name)))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


_POSITIVE = {"lr0", "lrf", "anchor_t"}
_PROBABILITIES = {"flipud", "fliplr", "mosaic", "mixup", "label_smoothing", "lrf"}


def check_hyp_value(name: str, value: Any) -> float:
    """One hyperparameter as a float, or a ConfigError saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"hyp '{name}' must be a finite number, got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"hyp '{name}' must be > 0, got {value}")
    if name in _PROBABILITIES and not 0 <= value <= 1:
        raise ConfigError(f"hyp '{name}' must be in [0, 1], got {value}")
    if value < 0:
        raise ConfigError(f"hyp '{name}' must be >= 0, got {value}")
    return float(value)


def builtin_hyp_names() -> list[str]:
    files = resources.files("trainer.cfg").joinpath("hyps").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def load_hyp(source: str | Path | dict | None = None, overrides: dict[str, Any] | None = None) -> Hyp:
    """Load hyperparameters from a shipped name (`hyp.scratch`), a YAML path or a dict, then apply
    overrides. Unknown keys are errors, so a typo never silently falls back to a default."""
    origin = "defaults"
    values: dict[str, Any] = {}
    if isinstance(source, dict):
        values, origin = dict(source), "<dict>"
    elif source is not None:
        path = Path(source)
        stem = path.name.removesuffix(".yaml")
        if path.is_file():
            text, origin = path.read_text(), str(path)
        elif stem in builtin_hyp_names():
            text = resources.files("trainer.cfg").joinpath("hyps", f"{stem}.yaml").read_text()
            origin = f"trainer/cfg/hyps/{stem}.yaml"
        else:
            raise ConfigError(f"--hyp {source}: no such file, and not one of {builtin_hyp_names()}")
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin}: invalid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: expected a mapping of hyperparameters")
    known = {f.name for f in fields(Hyp)}
    for key, value in (overrides or {}).items():  # checked apart so the error names the flag
        if key not in known:
            raise ConfigError(f"--hyp-override {key}: unknown hyperparameter; known: {sorted(known)}")
        try:
            check_hyp_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"--hyp-override {key}={value}: {e}") from None
    values.update(overrides or {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{origin}: unknown hyperparameters {unknown}")
    try:
        return Hyp(**values)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (values parsed as YAML scalars) -> dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


MEMORY_FORMATS = ("channels_last", "contiguous")


@dataclass(frozen=True)
class TrainOptions:
    """Everything a training run was asked to do (the CLI flags), saved as opt.yaml."""

    data: str = ""                # local path or s3://bucket/prefix/data.yaml (kept as given in opt.yaml)
    cfg: str = ""                 # architecture; empty = the --weights file's, else yolov5n
    weights: str = ""
    hyp: str = "hyp.scratch"
    hyp_overrides: tuple[tuple[str, Any], ...] = ()
    epochs: int = 100
    batch_size: int = 16          # total over all ranks
    nbs: int = 64                 # nominal batch: gradients accumulate until ~nbs images make one step
    imgsz: int = 640
    image_weights: bool = False
    multi_scale: bool = False
    rect: bool = False
    resume: str = ""
    device: str = ""              # "", "cpu", "0", "cuda:0"
    workers: int = 8              # upper bound per rank; sized to the CPUs actually available
    project: str = "runs/train"   # local folder or s3://bucket/prefix (staged locally, synced each epoch)
    name: str = "exp"
    exist_ok: bool = False
    seed: int = 0
    sync_bn: bool = False
    optimizer: str = "SGD"        # SGD (Nesterov), Adam or AdamW
    linear_lr: bool = False       # linear LR decay instead of cosine
    patience: int = 100           # epochs without fitness improvement before stopping; 0 = never
    amp: str = "auto"             # auto, fp16, bf16 or off
    memory_format: str = "channels_last"  # NHWC: 1.35x the fp32 training step of NCHW on CPU (bench/bench_train_step.py)
    cache: str = "auto"           # decoded images in RAM: auto (when they fit a quarter of free memory), ram or off
    noval: bool = False           # validate only on the final epoch (same as val_every 0)
    val_every: int = 1            # validate (and refresh maps) every N epochs and after the last; 0 = last only
    sampler: str = ""             # uniform, classic, rfs or adaptive; "" = classic with image_weights, else uniform
    rfs_t: float = 0.1            # repeat threshold t of rfs/adaptive (LVIS uses 0.001 for ~1,000 classes)
    sampler_power: float = 2.0    # adaptive: exponent on each class's AP deficit
    cls_feedback: float = 0.0     # weight the class loss by the AP deficit ** this; 0 = off
    maps: str = ""                # maps.json from an earlier evaluation, seeds image weights
    class_weights: str = ""       # class_weights.json (from the pipeline's step); default: from the labels
    stop_epoch: int = 0           # train epochs [start, stop) of an `epochs` schedule; 0 = all
    deterministic: bool = False
    dist_timeout: float = 1800.0  # seconds a collective (or joining the group) may wait for a peer
    grace_period: float = 25.0    # seconds from SIGTERM/SIGINT to a saved, resumable exit (pods get 30)
    results_plot: str = "always"  # results.png when this run ends (always) or only when the schedule does (end)
    compile: str = ""             # torch.compile backend for the training model (inductor, aot_eager, ...); "" = eager

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.nbs >= 1, f"--nbs must be >= 1, got {self.nbs}"),
            (self.imgsz >= 32, f"--imgsz must be >= 32, got {self.imgsz}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.patience >= 0, f"--patience must be >= 0, got {self.patience}"),
            (self.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}"),
            (self.grace_period > 0, f"--grace-period must be > 0 seconds, got {self.grace_period}"),
            (self.results_plot in ("always", "end"), f"--results-plot must be always or end, got {self.results_plot!r}"),
            (self.optimizer in ("SGD", "Adam", "AdamW"), f"--optimizer must be SGD, Adam or AdamW, got {self.optimizer!r}"),
            (self.amp in ("auto", "fp16", "bf16", "off"), f"--amp must be auto, fp16, bf16 or off, got {self.amp!r}"),
            (self.memory_format in MEMORY_FORMATS,
             f"--memory-format must be one of {list(MEMORY_FORMATS)}, got {self.memory_format!r}"),
            (self.cache in CACHE_MODES, f"--cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}"),
            (0 <= self.stop_epoch <= self.epochs, f"--stop-epoch must be in [0, --epochs], got {self.stop_epoch}"),
            (not (self.rect and self.sampler_kind != "uniform"), "--rect and --image-weights/--sampler can't be "
             "combined: rectangular training fixes the image order, a sampler redraws it"),
            (not (self.image_weights and self.sampler not in ("", "classic")),
             f"--image-weights means --sampler classic; it can't be combined with --sampler {self.sampler}"),
            (self.sampler in ("",) + SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}"),
            (0 < self.rfs_t <= 1, f"--rfs-t must be in (0, 1], got {self.rfs_t}"),
            (0 <= self.sampler_power <= 8, f"--sampler-power must be in [0, 8], got {self.sampler_power}"),
            (0 <= self.cls_feedback <= 8, f"--cls-feedback must be in [0, 8], got {self.cls_feedback}"),
            (self.val_every >= 0, f"--val-every must be >= 0, got {self.val_every}"),
            (not (self.rect and self.multi_scale), "--rect and --multi-scale can't be combined: rect batch shapes are fixed"),
            (bool(self.data) or bool(self.resume), "--data is required"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for flag, value in (("--data", self.data), ("--project", self.project), ("--resume", self.resume)):
            if is_s3(value):
                try:
                    S3Uri.parse(value)
                except StorageError as e:
                    raise ConfigError(f"{flag}: {e}") from None

    @property
    def sampler_kind(self) -> str:
        """The sampler in effect: --sampler, or classic for --image-weights, else uniform."""
        return self.sampler or ("classic" if self.image_weights else "uniform")

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(self.sampler_kind, self.rfs_t, self.sampler_power)

    def validates_after(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with a validation: every --val-every epochs, and
        always after the last epoch of the schedule."""
        if epoch + 1 == self.epochs:
            return True
        every = 0 if self.noval else self.val_every
        return every > 0 and (epoch + 1) % every == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hyp_overrides"] = dict(self.hyp_overrides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown options {unknown}")
        d = dict(d)
        d["hyp_overrides"] = tuple(sorted((d.get("hyp_overrides") or {}).items()))
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainOptions":
        return dataclasses.replace(self, **changes)


def save_yaml(obj: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
