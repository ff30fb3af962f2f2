"""YOLOv5 models built from YAML architecture files through an explicit module registry.

A YAML row is `[from, number, module, args]`. `module` must be a key of `REGISTRY`; names inside
`args` (`nc`, `anchors`) are looked up in the YAML's top-level keys. Nothing is evaluated.

    model = build_model("yolov5n", nc=6)
    raw = model(images)           # list of (B, na, H, W, 5 + nc) logits, one per level
    det = model.predict(images)   # (B, N, 5 + nc): xywh pixels, obj and class probabilities
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from trainer.models.blocks import C3, SPPF, Bottleneck, Concat, Conv, Detect


class ModelConfigError(ValueError):
    """An architecture YAML that cannot be built."""


@dataclass(frozen=True)
class LayerKind:
    """How the parser derives a layer's constructor arguments and output channels."""

    cls: Callable[..., nn.Module]
    channels: str  # "conv": args[0] is c2 (width-scaled); "concat": sum of inputs; "same": c2 = c1; "detect"
    repeats_inside: bool = False  # C3 takes `n` as an argument instead of being stacked n times


REGISTRY: dict[str, LayerKind] = {
    "Conv": LayerKind(Conv, "conv"),
    "Bottleneck": LayerKind(Bottleneck, "conv"),
    "C3": LayerKind(C3, "conv", repeats_inside=True),
    "SPPF": LayerKind(SPPF, "conv"),
    "Concat": LayerKind(Concat, "concat"),
    "Upsample": LayerKind(nn.Upsample, "same"),
    "nn.Upsample": LayerKind(nn.Upsample, "same"),  # the spelling in ultralytics' YAML files
    "Detect": LayerKind(Detect, "detect"),
}


def round_up(x: float, divisor: int = 8) -> int:
    """Smallest multiple of `divisor` >= x (YOLOv5's channel rounding)."""
    return int(math.ceil(x / divisor) * divisor)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed architecture file. `to_dict()` round-trips and is stored in every checkpoint."""

    name: str
    nc: int
    depth_multiple: float
    width_multiple: float
    anchors: tuple[tuple[float, ...], ...]
    backbone: tuple[tuple[Any, ...], ...]
    head: tuple[tuple[Any, ...], ...]
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "nc": self.nc, "depth_multiple": self.depth_multiple,
            "width_multiple": self.width_multiple, "anchors": [list(a) for a in self.anchors],
            "backbone": [list(r) for r in self.backbone], "head": [list(r) for r in self.head],
        }

    def with_nc(self, nc: int) -> "ModelSpec":
        return ModelSpec(self.name, nc, self.depth_multiple, self.width_multiple, self.anchors,
                         self.backbone, self.head, self.extra)


def _rows(raw: Any, key: str, origin: str) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise ModelConfigError(f"{origin}: '{key}' must be a non-empty list of [from, number, module, args] rows")
    rows = []
    for i, row in enumerate(raw):
        if not (isinstance(row, (list, tuple)) and len(row) == 4):
            raise ModelConfigError(f"{origin}: {key} row {i} must be [from, number, module, args], got {row!r}")
        src, n, module, args = row
        if module not in REGISTRY:
            raise ModelConfigError(f"{origin}: {key} row {i}: unknown module {module!r}; known: {sorted(REGISTRY)}")
        if not isinstance(n, int) or n < 1:
            raise ModelConfigError(f"{origin}: {key} row {i}: number must be a positive int, got {n!r}")
        rows.append((src, n, module, list(args or [])))
    return tuple(rows)


def model_spec_from_dict(d: dict, name: str = "custom", origin: str = "<dict>") -> ModelSpec:
    """Validate an architecture mapping (ours or an ultralytics checkpoint's `yaml`)."""
    missing = [k for k in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head") if k not in d]
    if missing:
        raise ModelConfigError(f"{origin}: missing keys {missing}")
    anchors = d["anchors"]
    if isinstance(anchors, int) or not all(isinstance(a, (list, tuple)) and len(a) % 2 == 0 for a in anchors):
        raise ModelConfigError(f"{origin}: anchors must be lists of w,h pairs per level, got {anchors!r}")
    return ModelSpec(
        name=str(d.get("name", name)), nc=int(d["nc"]),
        depth_multiple=float(d["depth_multiple"]), width_multiple=float(d["width_multiple"]),
        anchors=tuple(tuple(float(v) for v in a) for a in anchors),
        backbone=_rows(d["backbone"], "backbone", origin), head=_rows(d["head"], "head", origin),
    )


def builtin_model_names() -> list[str]:
    files = resources.files("trainer.cfg").joinpath("models").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def load_model_spec(cfg: str | Path | dict, nc: int | None = None) -> ModelSpec:
    """Load `yolov5n`..`yolov5x` (shipped), `yolov5n.yaml`, or a path to an architecture YAML."""
    if isinstance(cfg, dict):
        spec = model_spec_from_dict(cfg)
    else:
        path = Path(cfg)
        stem = path.name.removesuffix(".yaml")
        if not path.is_file() and stem in builtin_model_names():
            text = resources.files("trainer.cfg").joinpath("models", f"{stem}.yaml").read_text()
            origin = f"trainer/cfg/models/{stem}.yaml"
        elif path.is_file():
            text, origin = path.read_text(), str(path)
        else:
            raise ModelConfigError(f"model cfg {cfg!s} is neither a file nor one of {builtin_model_names()}")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object that safe_load refuses
            mark = getattr(e, "problem_mark", None)
            where = f"{origin}:{mark.line + 1}" if mark is not None else origin
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ModelConfigError(f"{where}: not a valid model YAML ({what})") from None
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{origin}: a model YAML must be a mapping (backbone, head, nc, ...)")
        spec = model_spec_from_dict(raw, name=stem, origin=origin)
    return spec.with_nc(nc) if nc is not None and nc != spec.nc else spec


def _resolve_arg(a: Any, spec: ModelSpec) -> Any:
    if isinstance(a, str):
        if a == "nc":
            return spec.nc
        if a == "anchors":
            return [list(x) for x in spec.anchors]
        if a == "None":  # ultralytics YAMLs spell null as a string
            return None
    return a


def build_layers(spec: ModelSpec, ch_in: int = 3) -> tuple[list[nn.Module], list[Any], set[int]]:
    """Parse rows into modules. Returns (layers, sources, indices whose outputs later layers need)."""
    layers: list[nn.Module] = []
    sources: list[Any] = []
    save: set[int] = set()
    channels = [ch_in]  # channels[i + 1] = output channels of layer i; channels[-1] for `from: -1`
    for i, (src, n, name, args) in enumerate(spec.backbone + spec.head):
        kind = REGISTRY[name]
        args = [_resolve_arg(a, spec) for a in args]
        srcs = src if isinstance(src, list) else [src]
        for s in srcs:
            if not isinstance(s, int) or s >= i or s < -1 - i:
                raise ModelConfigError(f"{spec.name}: layer {i} takes input from invalid layer {s!r}")
        in_ch = [channels[s + 1] if s >= 0 else channels[s] for s in srcs]
        depth = max(round(n * spec.depth_multiple), 1) if n > 1 else n
        if kind.channels == "conv":
            c2 = round_up(args[0] * spec.width_multiple, 8)
            args = [in_ch[0], c2, *args[1:]]
            if kind.repeats_inside:
                args.insert(2, depth)
                depth = 1
        elif kind.channels == "concat":
            c2 = sum(in_ch)
        elif kind.channels == "detect":
            args = [args[0], args[1], in_ch]
            c2 = 0
        else:
            c2 = in_ch[0]
        module = kind.cls(*args) if depth == 1 else nn.Sequential(*(kind.cls(*args) for _ in range(depth)))
        layers.append(module)
        sources.append(src)
        save.update(s % i for s in srcs if s != -1)
        channels.append(c2)
    if not isinstance(layers[-1], Detect):
        raise ModelConfigError(f"{spec.name}: the last layer must be Detect")
    return layers, sources, save


class YoloModel(nn.Module):
    """A YOLOv5 detector. `self.model` is an nn.Sequential so state_dict keys read `model.N.*`."""

    def __init__(self, spec: ModelSpec, ch: int = 3, names: list[str] | None = None):
        super().__init__()
        self.spec = spec
        layers, self.sources, self.save = build_layers(spec, ch)
        self.model = nn.Sequential(*layers)
        self.names = list(names) if names is not None else [f"class{i}" for i in range(spec.nc)]
        if len(self.names) != spec.nc:
            raise ModelConfigError(f"{len(self.names)} names for nc={spec.nc}")
        detect = self.detect
        detect.stride.copy_(self._probe_strides(ch))
        detect.anchors /= detect.stride.view(-1, 1, 1)  # pixels -> grid units of each level
        _fix_anchor_order(detect)
        detect.initialise_biases()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @property
    def nc(self) -> int:
        return self.detect.nc

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    @torch.no_grad()
    def _probe_strides(self, ch: int, size: int = 256) -> torch.Tensor:
        was_training = self.training
        self.eval()
        outs = self.forward(torch.zeros(1, ch, size, size))
        self.train(was_training)
        return torch.tensor([size / o.shape[-3] for o in outs], dtype=torch.float32)

    @property
    def channels_last(self) -> bool:
        """Whether the convolution weights are NHWC (`model.to(memory_format=torch.channels_last)`)."""
        weight = next((p for p in self.parameters() if p.dim() == 4), None)
        return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) \
            and not weight.is_contiguous()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # inputs follow the model's layout
        outputs: list[torch.Tensor | None] = []
        for i, (layer, src) in enumerate(zip(self.model, self.sources)):
            if src != -1:
                x = outputs[src] if isinstance(src, int) else [x if s == -1 else outputs[s] for s in src]
            x = layer(x)
            outputs.append(x if i in self.save else None)
        return x

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, N, 5 + nc) decoded boxes, before NMS."""
        return self.detect.decode(self.forward(x))

    def fused(self) -> "YoloModel":
        """An inference copy with every Conv's BatchNorm folded into its convolution (torch's
        `fuse_conv_bn_eval`): the same outputs to float rounding, one pass over memory fewer per
        layer. The copy is in eval mode and cannot train; `self` is untouched."""
        model = copy.deepcopy(self).eval()
        channels_last = self.channels_last
        for m in model.modules():
            if isinstance(m, Conv) and isinstance(m.bn, nn.BatchNorm2d):
                m.conv = fuse_conv_bn_eval(m.conv, m.bn)
                m.bn = nn.Identity()
        return model.to(memory_format=torch.channels_last) if channels_last else model


def _fix_anchor_order(detect: Detect) -> None:
    """Anchor sizes must grow with stride; flip them if a YAML lists levels the other way."""
    stride = detect.stride.view(-1, 1, 1)
    anchors_px = detect.anchors * stride  # (nl, na, 2) back to pixels: the flip happens there
    area = anchors_px.prod(-1).mean(-1)  # mean pixel area per level
    if (area[-1] - area[0]).sign() != (detect.stride[-1] - detect.stride[0]).sign():
        detect.anchors[:] = anchors_px.flip(0) / stride


def build_model(cfg: str | Path | dict | ModelSpec, nc: int | None = None,
                names: list[str] | None = None) -> YoloModel:
    """Build a freshly initialised model from a shipped name, a YAML path or a spec."""
    spec = cfg if isinstance(cfg, ModelSpec) else load_model_spec(cfg)
    if names is not None and nc is None:
        nc = len(names)
    if nc is not None:
        spec = spec.with_nc(nc)
    return YoloModel(spec, names=names)


@dataclass(frozen=True)
class ModelSummary:
    layers: int
    parameters: int
    gradients: int
    gflops: float  # at `imgsz` x `imgsz`, counting multiply-adds as 2 FLOPs

    def __str__(self) -> str:
        return (f"{self.layers} layers, {self.parameters:,} parameters, {self.gradients:,} gradients, "
                f"{self.gflops:.1f} GFLOPs")


def summarise(model: YoloModel, imgsz: int = 640) -> ModelSummary:
    """Parameter counts and GFLOPs. FLOPs are counted on a small probe and scaled by area,
    which is exact for convolutions as long as every level's map size divides evenly."""
    params = sum(p.numel() for p in model.parameters())
    grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    probe = int(model.stride.max().item()) * 2
    flops = conv_flops(model, probe) if _convolutions_only(model) else _counted_flops(model, probe)
    layers = sum(1 for _ in model.modules())
    return ModelSummary(layers, params, grads, flops / 1e9 * (imgsz / probe) ** 2)


# Modules that add no FLOPs of their own beyond what torch's FlopCounterMode counts for nn.Conv2d.
_NO_FLOPS = (nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.MaxPool2d, nn.Upsample,
             nn.Sequential, nn.ModuleList, Conv, C3, SPPF, Bottleneck, Concat, Detect)


def _convolutions_only(model: nn.Module) -> bool:
    return all(isinstance(m, (nn.Conv2d, *_NO_FLOPS)) for m in model.modules() if m is not model)


def _probe(model: nn.Module, size: int) -> torch.Tensor:
    """A zero image for `model`, on its device and in its dtype."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    w = first.weight
    return torch.zeros(1, first.in_channels, size, size, device=w.device, dtype=w.dtype)


def conv_flops(model: nn.Module, size: int) -> int:
    """FLOPs of one size x size image through `model`'s 2-D convolutions, counted as FlopCounterMode
    counts them (2 per multiply-add, bias not counted), from hooks on the live model: eval mode
    for the pass (no BatchNorm statistic moves), each module's own mode restored after, no copy."""
    total = 0

    def count(m: nn.Conv2d, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    modes = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model.eval()
        with torch.no_grad():
            model(_probe(model, size))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    return total


def _counted_flops(model: nn.Module, size: int) -> int:
    """torch's FlopCounterMode on a copy, for models with layers other than convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        m(_probe(m, size))
    return int(counter.get_total_flops())
