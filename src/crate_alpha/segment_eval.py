"""``crate-alpha segment-eval``: how well an encoder's own features segment real images.

Two protocols, each on data the user already has:

* PASCAL VOC 2012 val, coarse segmentation (the CRATE papers' protocol): the class token's
  attention of the last layer, thresholded per head to keep a fixed share of the attention
  mass (:func:`crate_alpha.interpret.coarse_segmentation`), is compared with the
  foreground of the ground truth (every object class against background; void pixels,
  255, ignored). Reported: IoU of foreground and of background over the whole set, and
  their mean (mIoU).
* COCO val2017, MaskCut (CutLER's unsupervised protocol): every image gives ``num_masks``
  masks (:func:`crate_alpha.interpret.maskcut`), scored by their order (the first cut is
  the most salient), evaluated class-agnostically with pycocotools: every ground-truth
  object becomes one "object" category, and box and mask AP, AP50, AP75 are reported.

Images are resized to the model's input size (square), and masks are resized back to
each image's own size before scoring.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .common import write_json
from .whitebox import WhiteboxError, batches, normalisation, prepare


def _to_size(masks: torch.Tensor, hw) -> np.ndarray:
    """Bool masks (..., h, w) resized (nearest) to the image's own (H, W)."""
    flat = masks.float().reshape(-1, 1, *masks.shape[-2:])
    m = torch.nn.functional.interpolate(flat, size=tuple(hw), mode="nearest")
    return m[:, 0].reshape(*masks.shape[:-2], *hw).bool().numpy()


def voc_coarse_miou(model, voc_root: os.PathLike, split: str = "val", limit: Optional[int] = None,
                    keep: float = 0.6, batch_size: int = 8, size: Optional[int] = None) -> dict:
    """Coarse segmentation on ``VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``."""
    from PIL import Image

    from . import interpret

    root = Path(voc_root)
    if (root / "VOC2012").is_dir():
        root = root / "VOC2012"
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.is_file():
        raise WhiteboxError(f"{ids_file} not found; --voc takes the VOC2012 folder (JPEGImages, SegmentationClass, "
                            "ImageSets/Segmentation)")
    ids = ids_file.read_text().split()[:limit]
    enc = interpret.encoder(model)
    mean, std, native = normalisation(model, enc)
    size = size or native
    inter = np.zeros(2)
    union = np.zeros(2)
    for batch in batches(ids, batch_size):
        pics = [Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB") for i in batch]
        # No crop here: the whole image is scored, so it is resized (not cropped) to the square input.
        x, _ = prepare([p.resize((size, size), Image.BICUBIC) for p in pics], size, mean, std)
        pred = interpret.coarse_segmentation(enc, x, keep=keep)
        for i, name in enumerate(batch):
            gt = np.array(Image.open(root / "SegmentationClass" / f"{name}.png"))
            valid = gt != 255
            fg_gt = (gt > 0) & valid
            fg = _to_size(pred[i], gt.shape)
            for c, (p, g) in enumerate([(~fg, ~fg_gt), (fg, fg_gt)]):
                inter[c] += (p & g & valid).sum()
                union[c] += ((p | g) & valid).sum()
    iou = inter / np.maximum(union, 1)
    return {"protocol": "voc-coarse", "images": len(ids), "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]), "miou": float(iou.mean()), "keep": keep, "image_size": size}


def coco_maskcut_ap(model, images_dir: os.PathLike, annotations: os.PathLike, limit: Optional[int] = None,
                    num_masks: int = 3, tau: float = 0.15, batch_size: int = 4, size: Optional[int] = None) -> dict:
    """Class-agnostic box and mask AP of MaskCut on a COCO-format set."""
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from . import interpret

    ann_path = Path(annotations)
    if not ann_path.is_file():
        raise WhiteboxError(f"annotation file {ann_path} not found (COCO instances_*.json)")
    data = json.loads(ann_path.read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise WhiteboxError(f"{ann_path} is not a COCO instances file: no {key!r}")
    # class-agnostic: one category for every object, crowd regions kept as COCO ignores them
    data["categories"] = [{"id": 1, "name": "object"}]
    for a in data["annotations"]:
        a["category_id"] = 1
    gt = COCO()
    gt.dataset = data
    gt.createIndex()
    img_ids = sorted(gt.getImgIds())[:limit]
    if not img_ids:
        raise WhiteboxError(f"{ann_path} lists no images")
    enc = interpret.encoder(model)
    mean, std, native = normalisation(model, enc)
    size = size or native
    dets: List[dict] = []
    for batch in batches(img_ids, batch_size):
        infos = gt.loadImgs(batch)
        pics = []
        for info in infos:
            path = Path(images_dir) / info["file_name"]
            if not path.is_file():
                raise WhiteboxError(f"image {path} listed in {ann_path.name} not found under {images_dir}")
            pics.append(Image.open(path).convert("RGB"))
        x, _ = prepare([p.resize((size, size), Image.BICUBIC) for p in pics], size, mean, std)
        masks = interpret.maskcut(enc, x, num_masks=num_masks, tau=tau)
        for info, m in zip(infos, masks):
            full = _to_size(m, (info["height"], info["width"]))
            for k in range(full.shape[0]):
                if not full[k].any():
                    continue
                rle = mask_utils.encode(np.asfortranarray(full[k].astype(np.uint8)))
                box = mask_utils.toBbox(rle).tolist()
                rle["counts"] = rle["counts"].decode("ascii")
                score = 1.0 - k / max(num_masks, 1)
                dets.append({"image_id": info["id"], "category_id": 1, "segmentation": rle, "bbox": box,
                             "score": score})
    result = {"protocol": "coco-maskcut", "images": len(img_ids), "num_masks": num_masks, "tau": tau,
              "image_size": size, "detections": len(dets)}
    for iou_type in ("bbox", "segm"):
        if not dets:
            result[iou_type] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            continue
        dt = gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1 means "no ground truth": report 0
        result[iou_type] = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}
    return result


def segment_eval(model, out: os.PathLike, voc: Optional[os.PathLike] = None, coco_images=None,
                 coco_annotations=None, limit: Optional[int] = None, **kwargs) -> dict:
    if voc is None and coco_annotations is None:
        raise WhiteboxError("nothing to evaluate: give --voc VOC2012_FOLDER and/or --coco-images DIR "
                            "--coco-annotations instances_val2017.json")
    if (coco_images is None) != (coco_annotations is None):
        raise WhiteboxError("--coco-images and --coco-annotations go together")
    results = {"model": str(model)}
    if voc is not None:
        results["voc"] = voc_coarse_miou(model, voc, limit=limit)
    if coco_annotations is not None:
        results["coco"] = coco_maskcut_ap(model, coco_images, coco_annotations, limit=limit, **kwargs)
    write_json(results, Path(out))
    return results
