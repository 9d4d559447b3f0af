"""``crate-alpha segment-eval``: how well an encoder's own features segment real images.

Two protocols, each on data the user already has:

* PASCAL VOC 2012 val, coarse segmentation (the CRATE papers' protocol): the class token's
  attention of the last layer, thresholded per head to keep a fixed share of the attention
  mass (:func:`crate_alpha.whitebox.interpret.coarse_segmentation`), is compared with the
  foreground of the ground truth (every object class against background; void pixels,
  255, ignored). Reported: IoU of foreground and of background over the whole set, and
  their mean (mIoU).
* COCO val2017, MaskCut (CutLER's unsupervised protocol): every image gives ``num_masks``
  masks (:func:`crate_alpha.whitebox.interpret.maskcut`), scored by their order (the first cut is
  the most salient), evaluated class-agnostically with pycocotools: every ground-truth
  object becomes one "object" category, and box and mask AP, AP50, AP75 are reported.

Images are resized to the model's input size (square), and masks are resized back to
each image's own size before scoring.

Everything that can be checked without the model is checked first: the ``--out`` path,
the annotation file's fields, that the images exist and that there is ground truth to
score (COCOeval's AP of -1, "no ground truth", is never reported as a number).
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..common import check_writable_parent, write_json
from ..errors import WhiteboxError
from .commands import batches, normalisation, prepare

# the fields pycocotools reads from each entry (the category is replaced: the protocol is class-agnostic)
IMAGE_FIELDS = ("id", "file_name", "width", "height")
ANNOTATION_FIELDS = ("id", "image_id", "bbox", "area", "segmentation")
PROTOCOLS = {"voc": "voc-coarse", "coco": "coco-maskcut"}  # what a results file of this command holds


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


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _entry_problem(entry, fields) -> Optional[str]:
    """What is wrong with one image or annotation entry, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    missing = [f for f in fields if f not in entry]
    if missing:
        return "has no " + ", ".join(repr(f) for f in missing)
    if "file_name" in fields:
        if not isinstance(entry["file_name"], str):
            return "has a 'file_name' that is not a string"
        if not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] > 0
                   for k in ("width", "height")):
            return "has a 'width' or 'height' that is not a positive whole number"
        return None
    bbox = entry["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        return "has a 'bbox' that is not [x, y, width, height]"
    if not _number(entry["area"]):
        return "has an 'area' that is not a number"
    seg = entry["segmentation"]
    polygons = isinstance(seg, list) and seg and all(isinstance(p, list) and p and all(_number(v) for v in p)
                                                     for p in seg)
    rle = isinstance(seg, dict) and "counts" in seg and "size" in seg
    if not (polygons or rle):
        return "has a 'segmentation' that is neither a list of polygons nor an RLE object (counts, size)"
    return None


def _coco_ground_truth(images_dir: os.PathLike, annotations: os.PathLike, limit: Optional[int]) -> Tuple:
    """(COCO index, ids of the images to evaluate) from a checked, class-agnostic instances file."""
    from pycocotools.coco import COCO

    ann_path = Path(annotations)
    if not ann_path.is_file():
        raise WhiteboxError(f"annotation file {ann_path} not found (COCO instances_*.json)")
    try:
        data = json.loads(ann_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WhiteboxError(f"{ann_path} is not valid JSON ({e}); --coco-annotations takes a COCO instances file, "
                            "e.g. annotations/instances_val2017.json") from None
    if not isinstance(data, dict):
        raise WhiteboxError(f"{ann_path}: is not a COCO instances file (it holds a JSON {type(data).__name__})")
    for key in ("images", "annotations"):
        if key not in data:
            raise WhiteboxError(f"{ann_path} is not a COCO instances file: no {key!r}")
        if not isinstance(data[key], list):
            raise WhiteboxError(f"{ann_path}: {key!r} is not a list")
    for key, fields in (("images", IMAGE_FIELDS), ("annotations", ANNOTATION_FIELDS)):
        seen = set()
        for n, entry in enumerate(data[key]):
            problem = _entry_problem(entry, fields)
            if problem is None and entry["id"] in seen:
                problem = f"repeats id {entry['id']!r}"  # pycocotools would keep only the last one
            if problem:
                raise WhiteboxError(f"{ann_path}: {key}[{n}] {problem}; fix the file or give an unaltered COCO "
                                    "instances file")
            seen.add(entry["id"])
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
    objects = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=img_ids)) if not a.get("iscrowd")]
    if not objects:
        where = f"its first {len(img_ids)} images have" if limit is not None else "it has"
        raise WhiteboxError(f"{ann_path} has no ground-truth objects to score ({where} no annotations other than "
                            "crowd regions, which COCO ignores); give an instances file with annotations")
    for info in gt.loadImgs(img_ids):
        path = Path(images_dir) / info["file_name"]
        if not path.is_file():
            raise WhiteboxError(f"image {path} listed in {ann_path.name} not found under {images_dir}")
    return gt, img_ids


def coco_maskcut_ap(model, images_dir: os.PathLike, annotations: os.PathLike, limit: Optional[int] = None,
                    num_masks: int = 3, tau: float = 0.15, batch_size: int = 4, size: Optional[int] = None) -> dict:
    """Class-agnostic box and mask AP of MaskCut on a COCO-format set."""
    gt, img_ids = _coco_ground_truth(images_dir, annotations, limit)
    return _maskcut_ap(model, images_dir, gt, img_ids, num_masks, tau, batch_size, size)


def _maskcut_ap(model, images_dir, gt, img_ids, num_masks: int = 3, tau: float = 0.15, batch_size: int = 4,
                size: Optional[int] = None) -> dict:
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    from . import interpret

    enc = interpret.encoder(model)
    mean, std, native = normalisation(model, enc)
    size = size or native
    dets: List[dict] = []
    for batch in batches(img_ids, batch_size):
        infos = gt.loadImgs(batch)
        pics = [Image.open(Path(images_dir) / info["file_name"]).convert("RGB") for info in infos]
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
        stats = [float(s) for s in ev.stats[:3]]  # never -1 ("no ground truth"): there is some (checked)
        result[iou_type] = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}
    return result


def _check_out(out: Path) -> None:
    """Refuse an --out the results could not be written to, or that holds a file of the user's."""
    if out.is_dir():
        raise WhiteboxError(f"--out {out} is a folder; give the path of the results JSON, e.g. {out / 'results.json'}")
    if os.path.lexists(out):
        try:
            found = json.loads(out.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            found = None
        ours = isinstance(found, dict) and "model" in found and any(
            isinstance(found.get(k), dict) and found[k].get("protocol") == v for k, v in PROTOCOLS.items())
        if not ours:
            raise WhiteboxError(f"{out} exists and is not a segment-eval result; nothing was changed. Give another "
                                "--out, or move the file away")
    check_writable_parent(out, "--out", WhiteboxError)


def segment_eval(model, out: os.PathLike, voc: Optional[os.PathLike] = None, coco_images=None,
                 coco_annotations=None, limit: Optional[int] = None, **kwargs) -> dict:
    if voc is None and coco_annotations is None:
        raise WhiteboxError("nothing to evaluate: give --voc VOC2012_FOLDER and/or --coco-images DIR "
                            "--coco-annotations instances_val2017.json")
    if (coco_images is None) != (coco_annotations is None):
        raise WhiteboxError("--coco-images and --coco-annotations go together")
    if limit is not None and limit < 1:
        raise WhiteboxError(f"--limit is {limit}; give at least 1 image, or leave it out for the whole set")
    if kwargs.get("num_masks", 1) < 1:
        raise WhiteboxError(f"--num-masks is {kwargs['num_masks']}; MaskCut needs at least 1 mask per image")
    # checked before any evaluation, so that a bad --out or annotation file costs nothing
    out = Path(out)
    _check_out(out)
    coco = _coco_ground_truth(coco_images, coco_annotations, limit) if coco_annotations is not None else None
    results = {"model": str(model)}
    if voc is not None:
        results["voc"] = voc_coarse_miou(model, voc, limit=limit)
    if coco is not None:
        results["coco"] = _maskcut_ap(model, coco_images, *coco, **kwargs)
    write_json(results, out)
    return results
