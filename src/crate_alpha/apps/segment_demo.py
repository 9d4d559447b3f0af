"""``make demo-segment``: does a digit classifier's attention segment the digit? Measured.

The seed's claim is that CRATE-α's attention segments objects it was never taught to
segment, better than a ViT's. This demo measures it on a task small enough for two CPU cores:

* **Data.** Real handwritten digits (scikit-learn's ``load_digits``, 8×8, 0..16) upsampled
  (bicubic) to a random size (24-44 px) and pasted, in a random bright or dark colour
  contrasting with what lies beneath, at a random place on a random-scale crop (64-320 px,
  resized to 64) of a real photograph (``sklearn.datasets.load_sample_images()``: china.jpg
  and flower.jpg, 427×640). The digit's intensity is its alpha; the ground-truth mask is
  ``alpha > 0.5`` at 64 px. Training images come from the 1,437-digit train split
  (``train_test_split`` stratified, seed 0, as :mod:`crate_alpha.data.digits`) on crops of
  the *left* half of each photo, drawn afresh for every batch; held-out images from the other
  360 digits on crops of the *right* half, placed once (fixed seed). The halves are cut apart
  before any resizing, so no background pixel is shared.
* **Models.** CRATE-α (``crate_alpha_demo_patch8_64``), CRATE (``crate_demo_patch8_64``) and
  a timm ViT (``vit_tiny_patch16_224`` rebuilt at width 128, depth 4, 4 heads, patch 8,
  64 px, MLP ratio 4 like ODL's 4d dictionary), each a 10-way digit classifier on its class
  token. One recipe for all: AdamW (lr 1e-3, wd 0.05 on matrices), linear warm-up over 10%
  of the budget then cosine, both by the elapsed share of the budget, label smoothing 0.1,
  batch 32, gradient clipping 1.0, bf16 autocast, 2 threads; the same wall-clock budget each.
* **Curriculum.** From scratch, these small transformers sit at chance on the full task for
  longer than the budget. So for the first 20% of its budget a model sees the easy version
  (digits 44 px and centred, the photo faded to dark grey, so bright digits), which then
  ramps linearly to the full task at 60%; the last 40% is the held-out distribution.
* **Fair clock.** The models take turns step by step, and each is charged only the time of
  its own steps (data generation included), so anything else loading the machine slows
  all of them alike; the steps each got are in ``training``.
* **Scores.** ``top1``: accuracy on the 360 held-out images. ``maskcut_miou``: the first
  MaskCut mask (:func:`crate_alpha.whitebox.interpret.maskcut`, ``num_masks=1``: normalised cut of the
  last block's subspace / key features) against the digit's mask. ``attention_miou``: the
  class token's last-layer attention, per head the patches holding 60% of its mass, merged by
  head majority (:func:`crate_alpha.whitebox.interpret.coarse_segmentation`, ``keep=0.6``). **mIoU
  here is the mean over images of the foreground IoU** (|pred ∩ gt| / |pred ∪ gt| of the
  digit's pixels, per image), not the VOC-style foreground/background mean. Masks are
  patch-level (8 px) while strokes are thin, so ``baselines`` gives the best any patch mask
  can do (``patch_oracle_miou``) and the whole-image mask's score (``whole_image_miou``).

Writes ``OUT/results.json`` (``rows``: model, top1, maskcut_miou, attention_miou, seconds
of training; plus ``notes``, ``baselines``, ``config`` and per-model ``training``),
``OUT/segmentation.png`` (rows: image, ground truth, then each model's MaskCut and
attention masks) and ``OUT/<model>.safetensors`` (each trained state dict). Nothing else in
OUT is touched.
"""
from __future__ import annotations

import colorsys
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..common import atomic_write, write_json
from ..visualize import save_png

SIZE = 64
DIGIT_SIZES = (24, 44)          # pasted digit side, px (inclusive)
CROP_SIDES = (64, 320)          # background crop side in photo pixels (320: the half-photo's width)
CROP_LEVELS = 12                # crop sides are drawn from this many geometric steps
EVAL_SEED_OFFSET = 10_000       # held-out placements are fixed by (seed + this)
BATCH = 32                      # small batches: more updates in the budget
LR = 1e-3
CURRICULUM = (0.2, 0.6)         # share of the budget: easiest data until the first, full difficulty from the second
MEAN = (0.485, 0.456, 0.406)    # ImageNet, as timm's IMAGENET_DEFAULT_MEAN/STD
STD = (0.229, 0.224, 0.225)

MODELS = [
    # row name, timm name, extra kwargs
    ("crate-alpha-demo", "crate_alpha_demo_patch8_64", {}),
    ("crate-demo", "crate_demo_patch8_64", {}),
    ("vit-demo", "vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                              mlp_ratio=4.0)),
]
NOTES = ("top1: accuracy on all held-out digits (360). maskcut_miou / attention_miou: mean over the first eval_images "
         "held-out images of the foreground IoU |pred & gt| / |pred | gt| between the predicted mask and the pasted "
         "digit's pixels (alpha > 0.5), not the VOC foreground/background mean; MaskCut: the first mask of "
         "interpret.maskcut(num_masks=1, tau=0.15); attention: interpret.coarse_segmentation(keep=0.6), the class "
         "token's last-layer attention. Masks are patch-level (8 px): baselines.patch_oracle_miou is the best any "
         "patch mask can score, baselines.whole_image_miou what the all-foreground mask scores. seconds: wall-clock "
         "time charged to the model's own training steps (models take turns step by step; same budget for each; "
         "steps per model under 'training').")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def digits_split(seed: int = 0):
    """(pixels (N, 64) float 0..16, labels (N,)) of the train and held-out splits, as data/digits.py cuts them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=seed, stratify=d.target)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ((d.data[train_idx].astype(np.float32), d.target[train_idx].astype(np.int64)),
            (d.data[test_idx].astype(np.float32), d.target[test_idx].astype(np.int64)))


@lru_cache(maxsize=1)
def _photos() -> torch.Tensor:
    """The two scikit-learn sample photos, (2, 3, 427, 640) float in [0, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs])


def photo_region(split: str) -> slice:
    """Columns of every photo that a split's backgrounds come from: left half train, right half held-out."""
    w = _photos().shape[-1]
    if split == "train":
        return slice(0, w // 2)
    if split == "test":
        return slice(w // 2, w)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@lru_cache(maxsize=2)
def _pyramid(split: str):
    """Per crop side s: (s, the split's half-photos resized by 64/s, antialiased). Halves are cut before resizing."""
    half = _photos()[..., photo_region(split)]
    top = min(CROP_SIDES[1], *half.shape[-2:])
    sides = sorted({int(round(s)) for s in np.geomspace(CROP_SIDES[0], top, CROP_LEVELS)})
    levels = []
    for s in sides:
        hw = (int(half.shape[-2] * SIZE / s), int(half.shape[-1] * SIZE / s))
        levels.append((s, F.interpolate(half, size=hw, mode="bilinear", antialias=True, align_corners=False)
                       .clamp(0, 1)))
    return levels


def _digit_alpha(pixels: np.ndarray, side: int) -> torch.Tensor:
    """An 8x8 digit (0..16) upsampled (bicubic) to side x side, as alpha in [0, 1]."""
    x = torch.from_numpy(np.asarray(pixels, np.float32).reshape(1, 1, 8, 8)) / 16
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)


def make_images(pixels: np.ndarray, labels: np.ndarray, split: str, seed: int,
                difficulty: float = 1.0) -> Dict[str, torch.Tensor]:
    """Digits pasted on photo crops; a pure function of its arguments.

    Returns ``images`` (N, 3, 64, 64) float in [0, 1], ``masks`` (N, 64, 64) bool (alpha > 0.5),
    ``labels`` (N,), ``backgrounds`` (N, 3, 64, 64) (the crop before pasting), ``alpha`` (N, 64, 64),
    ``boxes`` (N, 4) int: photo index, x0, y0, side of the background crop in the original photo's
    pixel coordinates. ``difficulty`` < 1 (the training curriculum) fades the photo towards dark grey (so
    bright digits come first) and draws the digit larger and nearer the centre, by interpolating between
    the easy and the random draw; the random draws are the same whatever the difficulty.
    """
    rng = np.random.default_rng(seed)
    levels = _pyramid(split)
    col0 = photo_region(split).start
    n = len(labels)
    images = torch.empty(n, 3, SIZE, SIZE)
    backgrounds = torch.empty(n, 3, SIZE, SIZE)
    alpha = torch.zeros(n, SIZE, SIZE)
    boxes = np.zeros((n, 4), np.int64)
    for i in range(n):
        photo = int(rng.integers(2))
        side, level = levels[int(rng.integers(len(levels)))]
        h, w = level.shape[-2:]
        y, x = int(rng.integers(h - SIZE + 1)), int(rng.integers(w - SIZE + 1))
        bg = level[photo, :, y:y + SIZE, x:x + SIZE]
        if rng.random() < 0.5:
            bg = bg.flip(-1)
        if difficulty < 1:
            bg = difficulty * bg + (1 - difficulty) * 0.15
        scale = side / SIZE
        boxes[i] = (photo, col0 + int(x * scale), int(y * scale), side)
        k = int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1))
        py, px = rng.random(2)
        if difficulty < 1:
            k = int(round(DIGIT_SIZES[1] + difficulty * (k - DIGIT_SIZES[1])))
            py, px = 0.5 + difficulty * (py - 0.5), 0.5 + difficulty * (px - 0.5)
        py, px = int(py * (SIZE - k + 1)), int(px * (SIZE - k + 1))
        a = torch.zeros(SIZE, SIZE)
        a[py:py + k, px:px + k] = _digit_alpha(pixels[i], k)
        # A colour that contrasts with the background under the digit: bright on dark, dark on bright.
        lum = float((bg[:, py:py + k, px:px + k].mean((1, 2)) * torch.tensor([0.299, 0.587, 0.114])).sum())
        hue, sat = rng.random(), rng.uniform(0, 0.8)
        value = rng.uniform(0.8, 1.0) if lum < 0.5 else rng.uniform(0.0, 0.25)
        colour = torch.tensor(colorsys.hsv_to_rgb(hue, sat, value), dtype=torch.float32)
        images[i] = bg * (1 - a) + colour[:, None, None] * a
        backgrounds[i] = bg
        alpha[i] = a
    return {"images": images, "masks": alpha > 0.5, "labels": torch.as_tensor(labels, dtype=torch.long),
            "backgrounds": backgrounds, "alpha": alpha, "boxes": torch.from_numpy(boxes)}


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# --------------------------------------------------------------------------------------
# Models, training, evaluation
# --------------------------------------------------------------------------------------

def create(timm_name: str, **kwargs) -> torch.nn.Module:
    import timm  # crate_alpha_* and CRATE's crate_* are registered in it (this package is imported)
    return timm.create_model(timm_name, num_classes=10, **kwargs)


def lr_at(frac: float, peak: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine to zero."""
    if frac < warmup:
        return peak * frac / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (frac - warmup) / (1 - warmup))))


class Trainer:
    """One model's training state; :meth:`step` does one update and charges its wall time to this model.

    Batch ``k`` holds the same digits and placements for every model (seeded by ``seed`` and ``k``); only its
    difficulty follows this model's own elapsed share of the budget. Curriculum: over the first ``curriculum``
    share of the budget the photo fades in from dark grey and the digits shrink and spread out from large and
    central (see :func:`make_images`), since from-scratch transformers otherwise sit at chance for longer than
    the budget on cluttered backgrounds; from then on the data are the held-out distribution's.
    """

    def __init__(self, name: str, model: torch.nn.Module, pixels: np.ndarray, labels: np.ndarray, budget_s: float,
                 seed: int = 0, batch_size: int = BATCH, lr: float = LR, weight_decay: float = 0.05,
                 curriculum: Tuple[float, float] = CURRICULUM, log_every: int = 100):
        if len(labels) < batch_size:
            raise ValueError(f"{len(labels)} training images are fewer than one batch of {batch_size}")
        self.name, self.model, self.pixels, self.labels = name, model, pixels, labels
        self.budget_s, self.seed, self.batch_size, self.lr = budget_s, seed, batch_size, lr
        self.curriculum, self.log_every = curriculum, log_every
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim > 1 and "pos_embed" not in n]
        no_decay = [p for n, p in params if p.ndim <= 1 or "pos_embed" in n]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.}], lr=lr)
        self.elapsed = 0.0
        self.steps = 0
        self.loss_ema: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.elapsed >= self.budget_s

    def difficulty(self, frac: float) -> float:
        start, end = self.curriculum
        return 1.0 if frac >= end else max(0.0, (frac - start) / (end - start))

    def step(self) -> None:
        t0 = time.perf_counter()
        frac = self.elapsed / self.budget_s
        rng = np.random.default_rng([self.seed, self.steps])
        idx = rng.choice(len(self.labels), self.batch_size, replace=False)
        data = make_images(self.pixels[idx], self.labels[idx], "train", seed=int(rng.integers(2 ** 62)),
                           difficulty=self.difficulty(frac))
        lr = lr_at(frac, self.lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.model(normalise(data["images"]))
        loss = F.cross_entropy(logits.float(), data["labels"], label_smoothing=0.1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.steps += 1
        value = loss.item()
        self.loss_ema = value if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * value
        self.elapsed += time.perf_counter() - t0
        if self.steps % self.log_every == 0 or self.done:
            print(f"  [{self.name:<16}] step {self.steps:5d} loss {self.loss_ema:.3f} lr {lr:.1e} "
                  f"difficulty {self.difficulty(frac):.2f} {self.elapsed:6.1f}/{self.budget_s:.0f} s", flush=True)

    def summary(self) -> dict:
        return {"steps": self.steps, "samples": self.steps * self.batch_size,
                "epochs": self.steps * self.batch_size / len(self.labels), "final_loss": self.loss_ema,
                "seconds": self.elapsed}


def train_interleaved(trainers: List[Trainer]) -> None:
    """Round-robin one step per model until each has spent its budget.

    Each model is charged only the time of its own steps, and since the models take turns step by step,
    whatever else loads the machine meanwhile slows them all alike instead of whichever ran at the time.
    """
    while not all(t.done for t in trainers):
        for t in trainers:
            if not t.done:
                t.step()
    for t in trainers:
        t.model.eval()


def foreground_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of the foreground; pred and gt (N, H, W) bool. An empty union counts as 1."""
    pred = _to_size(pred, gt.shape[-2:])
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def patch_oracle_iou(gt: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """Per image, the best foreground IoU any union of patch x patch cells can reach against ``gt`` (N, H, W).

    For k cells, the k holding the most ground-truth pixels are best (the most intersection and the least
    union), so the best over every k of those top-k unions is the best of all.
    """
    n, h, w = gt.shape
    cover = gt.reshape(n, h // patch, patch, w // patch, patch).sum((2, 4)).flatten(1).float()   # (N, cells)
    cover = cover.sort(dim=1, descending=True).values
    inter = cover.cumsum(1)
    union = gt.flatten(1).sum(1, keepdim=True).float() + (patch * patch - cover).cumsum(1)
    return (inter / union).amax(1)


def _to_size(masks: torch.Tensor, hw) -> torch.Tensor:
    if tuple(masks.shape[-2:]) == tuple(hw):
        return masks.bool()
    return F.interpolate(masks.float()[:, None], size=tuple(hw), mode="nearest")[:, 0].bool()


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: Dict[str, torch.Tensor], eval_images: int, batch_size: int = 60) -> dict:
    """top-1 on every held-out image; per-image MaskCut and attention masks on the first ``eval_images``."""
    from ..whitebox import interpret

    model.eval()
    x = normalise(test["images"])
    correct = 0
    for b in range(0, len(x), batch_size):
        correct += int((model(x[b:b + batch_size]).argmax(-1) == test["labels"][b:b + batch_size]).sum())
    n_seg = min(eval_images, len(x))
    mc, att = [], []
    for b in range(0, n_seg, batch_size):
        xb = x[b:min(b + batch_size, n_seg)]
        mc.append(_to_size(interpret.maskcut(model, xb, num_masks=1)[:, 0], (SIZE, SIZE)))
        att.append(_to_size(interpret.coarse_segmentation(model, xb, keep=0.6), (SIZE, SIZE)))
    mc, att = torch.cat(mc), torch.cat(att)
    gt = test["masks"][:n_seg]
    return {"top1": correct / len(x), "maskcut_iou": foreground_iou(mc, gt), "attention_iou": foreground_iou(att, gt),
            "maskcut": mc, "attention": att}


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------

def _save_state(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp):
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~umask)           # as any other file written here, not the library's 0600

    atomic_write(path, write)


def plot(test: Dict[str, torch.Tensor], results: Dict[str, dict], path: Path, columns: int = 8) -> Path:
    """Rows: image, ground truth, then each model's MaskCut and attention masks; one column per held-out image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(columns, min(len(r["maskcut"]) for r in results.values()))
    rows = [("image", None), ("ground truth", test["masks"])]
    for name, r in results.items():
        rows += [(f"{name}\nMaskCut", r["maskcut"]), (f"{name}\nattention", r["attention"])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1.2, 1.3 * len(rows)), squeeze=False)
    for i, (title, masks) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            img = test["images"][j].permute(1, 2, 0).numpy()
            if masks is None:
                ax.imshow(img)
            else:
                m = masks[j].numpy()[..., None]
                ax.imshow(img * (0.25 + 0.75 * m) + np.array([1.0, 0.2, 0.2]) * 0.35 * m * (1 - img))
                if i >= 2:
                    iou = float(foreground_iou(masks[j:j + 1], test["masks"][j:j + 1])[0])
                    ax.set_title(f"IoU {iou:.2f}", fontsize=6, pad=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def table(rows: List[dict]) -> str:
    head = f"{'model':<18} {'top-1':>7} {'MaskCut mIoU':>13} {'attention mIoU':>15} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18} {100 * r['top1']:>6.1f}% {r['maskcut_miou']:>13.3f} "
                     f"{r['attention_miou']:>15.3f} {r['seconds']:>8.0f}")
    return "\n".join(lines)


def run(out: os.PathLike, budget_s: float = 250.0, eval_images: int = 360, seed: int = 0,
        models: Optional[List[str]] = None) -> dict:
    torch.set_num_threads(2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    (train_px, train_y), (test_px, test_y) = digits_split(0)
    test = make_images(test_px, test_y, "test", seed=seed + EVAL_SEED_OFFSET)
    print(f"{len(train_y)} training digits (fresh placements every batch), {len(test_y)} held-out images; "
          f"budget {budget_s:.0f} s per model", flush=True)
    trainers = []
    for name, timm_name, kwargs in MODELS:
        if models and name not in models:
            continue
        torch.manual_seed(seed)
        model = create(timm_name, **kwargs)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {timm_name}, {params / 1e6:.2f} M parameters", flush=True)
        trainers.append(Trainer(name, model, train_px, train_y, budget_s, seed=seed))
    print(f"\n=== training, models taking turns step by step, {budget_s:.0f} s each ===", flush=True)
    train_interleaved(trainers)
    print("\n=== evaluating on the held-out images ===", flush=True)
    rows, details, seg = [], {}, {}
    timm_names = {m[0]: m[1] for m in MODELS}
    for t in trainers:
        name, model = t.name, t.model
        info = t.summary()
        t_eval = time.time()
        ev = evaluate(model, test, eval_images)
        info.update(params=sum(p.numel() for p in model.parameters()), timm_name=timm_names[name],
                    eval_seconds=time.time() - t_eval)
        _save_state(model, out / f"{name}.safetensors")
        row = {"model": name, "top1": ev["top1"], "maskcut_miou": float(ev["maskcut_iou"].mean()),
               "attention_miou": float(ev["attention_iou"].mean()), "seconds": info["seconds"]}
        print(f"  {name}: top-1 {row['top1']:.3f}  MaskCut mIoU {row['maskcut_miou']:.3f}  attention mIoU "
              f"{row['attention_miou']:.3f}  ({info['steps']} steps, eval {info['eval_seconds']:.0f} s)", flush=True)
        rows.append(row)
        details[name] = info
        seg[name] = ev
    png = plot(test, seg, out / "segmentation.png")
    gt = test["masks"][:min(eval_images, len(test_y))]
    baselines = {"patch_oracle_miou": float(patch_oracle_iou(gt).mean()),
                 "whole_image_miou": float(foreground_iou(torch.ones_like(gt), gt).mean())}
    result = {"rows": rows, "notes": NOTES, "baselines": baselines,
              "config": {"budget_s": budget_s, "eval_images": min(eval_images, len(test_y)), "seed": seed,
                         "image_size": SIZE, "digit_sizes": list(DIGIT_SIZES), "crop_sides": list(CROP_SIDES),
                         "batch_size": BATCH, "lr": LR, "curriculum": list(CURRICULUM),
                         "weight_decay": 0.05, "label_smoothing": 0.1, "threads": torch.get_num_threads(),
                         "train_digits": len(train_y), "test_digits": len(test_y)},
               "training": details, "total_seconds": time.time() - t_start}
    write_json(result, out / "results.json")
    print("\n=== held-out digits on photo crops ===")
    print(table(rows))
    print(f"(best patch-level mask: mIoU {baselines['patch_oracle_miou']:.3f}; whole image: "
          f"{baselines['whole_image_miou']:.3f})")
    print(f"\n{out / 'results.json'}\n{png}\ntotal {result['total_seconds']:.0f} s")
    return result
