"""Top-1/top-5 evaluation as the official script does it (resize 256, centre crop 224, ImageNet
mean/std), for a training checkpoint or a converted ``local-dir:`` folder."""
from __future__ import annotations

from typing import Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..common import load_weights, local_dir, read_checkpoint, state_dict_of, timm_folder_config, write_json
from ..data.decode import SkipCounter
from ..errors import CheckpointError, ClassMismatch
from .data import check_path, class_names_of, eval_transform, make_loader


def load_for_eval(model: Optional[str], checkpoint: Optional[str], use_ema: bool = False):
    """(model, image size, mean, std, crop_pct, interpolation, class names or None)."""
    import timm  # CRATE-α is registered in it: importing this module imported crate_alpha first

    folder = local_dir(model)
    if folder is not None:
        timm_folder_config(folder)  # says so when it is not a timm folder
        m = timm.create_model(model, pretrained=True)  # timm applies the folder's config and weights
        pc = m.pretrained_cfg
        return (m, pc["input_size"][-1], pc.get("mean", IMAGENET_DEFAULT_MEAN), pc.get("std", IMAGENET_DEFAULT_STD),
                pc.get("crop_pct", 0.875), pc.get("interpolation", "bilinear"), pc.get("label_names"))
    if not checkpoint:
        raise CheckpointError("no checkpoint given: pass --checkpoint FILE (or --model local-dir:FOLDER)")
    ck = read_checkpoint(checkpoint, "checkpoint")  # an empty, damaged or code-running file: one line
    lacking = [k for k in ("model", "model_name", "num_classes", "image_size") if k not in ck]
    if lacking:
        raise CheckpointError(f"{checkpoint} is not a classification checkpoint of this trainer (it has no "
                              f"{', '.join(lacking)}); for converted weights pass --model local-dir:FOLDER")
    from .trainer import build_model

    name = model or ck["model_name"]
    m = build_model({"model": name, "img_size": ck["image_size"], "drop_path": 0.0}, ck["num_classes"])
    key = "ema" if use_ema and "ema" in ck else "model"
    load_weights(m, state_dict_of(ck[key], f"checkpoint {checkpoint}"), f"checkpoint {checkpoint}",
                 f"{name} with {ck['num_classes']} classes")
    return m, ck["image_size"], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, "bilinear", ck.get("class_names")


def check_classes(data: str, num_classes: int, class_names, source: str) -> None:
    """Refuse data whose classes are not the model's: top-1 over another label set means nothing.

    An ImageFolder's classes are its sorted class folders (torchvision's order, as the trainer
    saw them); shard labels are checked as they are read (:class:`_LabelsInRange`).
    """
    names = class_names_of(data)
    if names is None:
        return
    if len(names) != num_classes:
        raise ClassMismatch(f"{data} has {len(names)} class folders but {source} has a {num_classes}-class head: "
                            "evaluate it on data of the classes it was trained on")
    if class_names is not None and list(class_names) != names:
        k = next(i for i, (a, b) in enumerate(zip(names, class_names)) if a != b)
        raise ClassMismatch(f"{data}'s class folders are not the classes {source} was trained on: class {k} is "
                            f"{names[k]!r} here but {class_names[k]!r} there")


class _LabelsInRange:
    """The batches of ``loader``; a label the model has no class for is refused (shards carry no class list)."""

    def __init__(self, loader, num_classes: int, data: str, source: str):
        self.loader, self.num_classes, self.data, self.source = loader, num_classes, data, source

    def __iter__(self):
        for x, y in self.loader:
            y = torch.as_tensor(y)
            if len(y) and (int(y.max()) >= self.num_classes or int(y.min()) < 0):
                bad = int(y.max()) if int(y.max()) >= self.num_classes else int(y.min())
                raise ClassMismatch(f"{self.data} has class label {bad} but {self.source} has a {self.num_classes}-class "
                                    "head: evaluate it on data of the classes it was trained on")
            yield x, y

    def __len__(self):
        return len(self.loader)


def run_eval(data: str, output: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
             batch_size: int = 64, workers: int = 2, use_ema: bool = False, torchcompile=None) -> dict:
    check_path(data, "evaluation data")
    from .trainer import compiled, evaluate

    m, size, mean, std, crop_pct, interp, class_names = load_for_eval(model, checkpoint, use_ema)
    source = checkpoint if local_dir(model) is None else model
    check_classes(data, m.num_classes, class_names, source)
    skipped = SkipCounter()
    loader, _, _ = make_loader(data, eval_transform(size, mean, std, crop_pct, interp), batch_size, False, workers,
                               counter=skipped)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(compiled(m.to(device), torchcompile), _LabelsInRange(loader, m.num_classes, data, source), device,
                   amp_dtype=None)
    res.update({"model": model, "checkpoint": checkpoint, "data": str(data), "image_size": size, "crop_pct": crop_pct,
                "torchcompile": torchcompile, "skipped_images": skipped.count})
    write_json(res, output)
    return res
