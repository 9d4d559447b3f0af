"""Starting weights for a classifier: our checkpoints, an open_clip CRATE-α checkpoint's image
tower, or a converted released-weights folder (``local-dir:``)."""
from __future__ import annotations

import logging
from typing import Dict

import torch

from ..common import load_weights, local_dir, read_state_dict, timm_folder_config
from ..errors import CheckpointError

_log = logging.getLogger(__name__)


def read_state(source: str) -> Dict[str, torch.Tensor]:
    """The encoder+head state dict (timm key names) held by ``source``."""
    folder = local_dir(source)
    if folder is not None:
        f = folder / "model.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{folder} is not a timm model folder (no model.safetensors)")
        return read_state_dict(f, "initial_checkpoint")
    # checked: an empty, damaged or code-running file is named in one line; this trainer's
    # checkpoints hold their weights under "model"
    sd = read_state_dict(source, "initial_checkpoint")
    if any(k.startswith("visual.trunk.") for k in sd):  # an open_clip CRATE-α CLIP model
        return {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    return sd


def timm_model_args(source: str) -> Dict:
    """architecture + model_args of a timm ``local-dir:`` folder."""
    folder = local_dir(source)
    cfg = timm_folder_config(folder)
    return {"architecture": cfg["architecture"], **cfg.get("model_args", {})}


def load_encoder(model: torch.nn.Module, source: str, new_head: bool, load_patch_embed: bool) -> dict:
    """Load ``source`` into ``model``; position grids are resampled by the model itself."""
    sd = dict(read_state(source))
    report = {"source": source, "dropped": []}
    head_w = sd.get("head.weight")
    own = model.state_dict()
    if head_w is not None and not new_head:
        # a head of another width is another model's, named with its other keys below
        if "head.weight" not in own or own["head.weight"].shape[0] != head_w.shape[0]:
            theirs = head_w.shape[0]
            ours = own["head.weight"].shape[0] if "head.weight" in own else 0
            raise CheckpointError(f"{source} has a {theirs}-class head but the model has {ours} classes; set "
                                  "new_head=True to start a new head (or num_classes to match)")
    if new_head or head_w is None:
        for k in ("head.weight", "head.bias"):
            if k in sd:
                sd.pop(k)
                report["dropped"].append(k)
    if not load_patch_embed:
        # the official fine-tuning re-initialises the patch embedding
        for k in [k for k in sd if k.startswith("patch_embed.")]:
            sd.pop(k)
            report["dropped"].append(k)
    else:
        for k in [k for k in sd if k.startswith("patch_embed.")]:
            if k in own and own[k].shape != sd[k].shape:
                raise CheckpointError(f"{k} is {tuple(sd[k].shape)} in {source} but {tuple(own[k].shape)} here "
                                      "(another patch size?): set load_patch_embed=False to re-initialise it")
    # a head or patch embedding left out above is new; any other missing, unexpected or
    # mis-shaped key means another model's file, named in one line
    missing = load_weights(model, sd, f"initial_checkpoint {source}", "the model",
                           allow_missing=lambda k: k.startswith(("head.", "patch_embed.")) and k not in sd)
    report["new"] = sorted(missing)
    _log.info("initialised from %s (re-initialised: %s)", source, ", ".join(sorted(missing)) or "nothing")
    return report
