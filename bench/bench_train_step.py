"""Bench: the training step alone (forward + loss + backward + optimizer), by precision and memory layout.

One real COCO128 batch (mosaic-augmented, so the loss has realistic targets) is trained on
repeatedly; no loader, no EMA, no logging. Prints img/s per variant and each variant's gradient
agreement with an fp64 reference (cosine similarity over all parameters, from the same weights),
next to the cosine between the fp64 gradients of two different batches (SGD's own noise):

    python bench/bench_train_step.py                          # yolov5n at 320, batch 16, all variants
    python bench/bench_train_step.py --imgsz 640 --steps 5 --variants fp32 bf16
    python bench/bench_train_step.py --weights ../shared/weights/yolov5n.pt   # from the official weights

Variants: fp32; bf16 (autocast; kfyolo keeps BatchNorm and the activations after it in fp32, see
trainer/amp.py); `+cl` runs the model and the input channels_last; `+compile` compiles the model
as `--compile` does (torch.compile, inductor, in place) and reports the compile time. Time it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch

from trainer import compiled
from trainer.amp import Precision
from trainer.config import Hyp
from trainer.data.config import load_data_config
from trainer.data.dataset import YoloDataset
from trainer.loss import YoloLoss, scale_loss_gains
from trainer.models.pretrained import model_from_weights
from trainer.models.yolo import build_model

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "datasets" / "coco128" / "coco128.yaml"


def batch(imgsz: int, size: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data_config(COCO128)
    ds = YoloDataset.from_config(data, "train", img_size=imgsz, augment=True, hyp=Hyp().to_dict(), seed=0, workers=2)
    imgs, targets, _, _ = YoloDataset.collate_fn([ds[i] for i in range(first, first + size)])
    return imgs.float() / 255, targets


def gradient(model: torch.nn.Module, loss_fn: YoloLoss, imgs: torch.Tensor, targets: torch.Tensor,
             autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with autocast:
        raw = model(imgs)
    loss, _ = loss_fn([r.to(imgs.dtype) for r in raw], targets.to(imgs.dtype))
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--weights", default="", help="start from these weights (default: a fresh yolov5n)")
    p.add_argument("--variants", nargs="+", default=["fp32", "fp32+cl", "bf16", "bf16+cl"])
    args = p.parse_args()
    torch.manual_seed(0)
    imgs, targets = batch(args.imgsz, args.batch_size)
    base = model_from_weights(args.weights)[0] if args.weights else build_model("yolov5n", nc=80)
    base.train()
    loss_fn = YoloLoss(base.detect.anchors, base.nc, scale_loss_gains(Hyp().to_dict(), base.nc, 3, args.imgsz))
    ref = gradient(copy.deepcopy(base).double(), loss_fn, imgs.double(), targets, contextlib.nullcontext())
    print(f"yolov5n {'from ' + args.weights if args.weights else 'fresh'}, {args.imgsz} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    # The scale a precision's gradient error competes with: SGD's own noise, i.e. how far apart the
    # exact gradients of two different batches point.
    other_imgs, other_targets = batch(args.imgsz, args.batch_size, first=args.batch_size)
    other = gradient(copy.deepcopy(base).double(), loss_fn, other_imgs.double(), other_targets, contextlib.nullcontext())
    print(f"fp64 gradients of two different batches: cosine {float(torch.nn.functional.cosine_similarity(ref, other, dim=0)):.4f}")
    for variant in args.variants:
        dtype = torch.bfloat16 if variant.startswith("bf16") else None
        precision = Precision("cpu", dtype)
        model = copy.deepcopy(base)
        x = imgs
        if "+cl" in variant:
            model = model.to(memory_format=torch.channels_last)
            x = imgs.contiguous(memory_format=torch.channels_last)
        if variant.endswith("+compile"):
            t0 = time.perf_counter()
            compiled.compile_in_place(model, "inductor")  # what --compile does
            gradient(model, loss_fn, x, targets, precision.autocast())
            print(f"{variant}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        cos = float(torch.nn.functional.cosine_similarity(ref, gradient(model, loss_fn, x, targets,
                                                                        precision.autocast()), dim=0))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        for step in range(args.steps + 2):  # two warm-up steps
            if step == 2:
                t0 = time.perf_counter()
            gradient(model, loss_fn, x, targets, precision.autocast())
            opt.step()
        rate = args.batch_size * args.steps / (time.perf_counter() - t0)
        print(f"{variant:10s} {rate:7.1f} img/s   gradient cosine vs fp64 {cos:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
