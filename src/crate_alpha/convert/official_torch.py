"""The official PyTorch release (UCSC-VLAA/CRATE-alpha ``torch_inference``) to timm / open_clip.

Two layouts are recognised from their keys:

* classifier (``model/crate_alpha.py``): ``conv1``, ``cls_token``, ``pos_embedding``,
  ``transformer.layers.{i}.{0,1}...``, ``mlp_head.{0,1}`` (head LayerNorm eps 1e-5);
* CLIPA (``model/clipa_model.py``): ``visual.*`` with the MSSA projection stored three
  times in ``nn.MultiheadAttention.in_proj_weight``, and an OpenAI-CLIP-like text tower
  whose ``text_projection`` is stored transposed relative to open_clip.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch

from ..common import read_state_dict
from ..models.official_layout import (
    checked_tensor,
    block_count,
    check_names,
    check_shape,
    classifier_shape,
    classifier_state,
    clipa_vision_keys,
    clipa_vision_shape,
    clipa_vision_state,
    official_layout,
)
from .folders import ConversionError, check_out_dir, write_open_clip_folder, write_timm_folder
from .targets import (
    check_named_shape,
    classifier_args,
    clipa_model_cfg,
    clipa_preprocess_cfg,
    resolve_heads,
    resolve_text_heads,
    trunk_name,
)

StateDict = Dict[str, torch.Tensor]

# The key mapping is the model layer's (models/official_layout.py, which CrateAlpha loads the
# released files with); this module adds head counts from names, configs and folders.
detect_layout = official_layout


def load_torch_state_dict(path: os.PathLike) -> StateDict:
    """Read a plain tensor state dict; anything that needs code to unpickle is refused."""
    return read_state_dict(path, "checkpoint", ConversionError)


def convert_classifier(sd: StateDict, heads: Optional[int] = None, model: Optional[str] = None):
    """Official classifier state dict -> (architecture, model_args, timm state dict)."""
    shape = classifier_shape(sd)
    width, depth, patch, res = shape["width"], shape["depth"], shape["patch"], shape["res"]
    check_named_shape(model, {"width": width, "depth": depth, "patch": patch, "resolution": res})
    heads = resolve_heads(width, heads, model)
    info, out = classifier_state(sd, heads)
    # The official head LayerNorm is torch's default (eps 1e-5); block norms use 1e-6.
    args = classifier_args(width, depth, heads, patch, res, info["num_classes"], head_norm_eps=1e-5)
    return trunk_name(width, depth, heads, patch, res), args, out


def convert_clipa(sd: StateDict, heads: Optional[int] = None, text_heads: Optional[int] = None,
                  model: Optional[str] = None):
    """Official CLIPA state dict -> (open_clip model_cfg, preprocess_cfg, open_clip state dict)."""
    vision = clipa_vision_shape(sd)
    width, depth, patch, res = vision["width"], vision["depth"], vision["patch"], vision["res"]
    text_layers = block_count(sd, r"transformer\.resblocks\.(\d+)\.")
    expected = clipa_vision_keys(depth) | {"token_embedding.weight", "positional_embedding", "ln_final.weight",
                                           "ln_final.bias", "text_projection", "logit_scale"}
    for i in range(text_layers):
        b = f"transformer.resblocks.{i}"
        expected |= {f"{b}.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight",
                                          "attn.in_proj_bias", "attn.out_proj.weight",
                                          "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                                          "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                                          "mlp.c_proj.bias")}
    check_names(sd, expected, "official CLIPA state dict")

    for key, ndim, layout in (("visual.proj", 2, "(width, embed)"), ("token_embedding.weight", 2, "(vocab, width)"),
                              ("positional_embedding", 2, "(context, width)"),
                              ("transformer.resblocks.0.mlp.c_fc.weight", 2, "(hidden, width)")):
        checked_tensor(sd, key, ndim, layout)
    embed_dim = sd["visual.proj"].shape[1]
    vocab, text_width = sd["token_embedding.weight"].shape
    context = sd["positional_embedding"].shape[0]
    check_named_shape(model, {"width": width, "depth": depth, "patch": patch, "resolution": res},
                      {"text width": text_width, "text layers": text_layers, "vocabulary": vocab,
                       "context length": context, "embedding width": embed_dim})
    heads = resolve_heads(width, heads, model)
    text_heads = resolve_text_heads(text_width, text_heads, model)
    hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    check_shape(sd, "visual.class_embedding", (width,))
    check_shape(sd, "visual.proj", (width, embed_dim))
    # Stored as (embed, width) and applied as x @ W.T; open_clip applies x @ W.
    check_shape(sd, "text_projection", (embed_dim, text_width))
    check_shape(sd, "positional_embedding", (context, text_width))

    out = clipa_vision_state(sd, width, depth, "visual.trunk.")
    out.update({
        "visual.head.proj.weight": sd["visual.proj"].t(),
        "token_embedding.weight": sd["token_embedding.weight"],
        "positional_embedding": sd["positional_embedding"],
        "ln_final.weight": sd["ln_final.weight"],
        "ln_final.bias": sd["ln_final.bias"],
        "text_projection": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()),
    })
    for i in range(text_layers):
        b = f"transformer.resblocks.{i}"
        for k in sd:
            if k.startswith(b + "."):
                out[k] = sd[k]

    model_cfg = clipa_model_cfg(
        embed_dim, trunk_name(width, depth, heads, patch, res), res, vocab, context, text_width,
        text_heads, text_layers, text_mlp_ratio=hidden / text_width)
    return model_cfg, clipa_preprocess_cfg(res), out


def convert_official_torch(src: os.PathLike, out_dir: os.PathLike, heads: Optional[int] = None,
                           text_heads: Optional[int] = None, model: Optional[str] = None,
                           force: bool = False, tokenizer: Optional[os.PathLike] = None) -> dict:
    """Convert an official ``.pth`` into a timm (classifier) or open_clip (CLIPA) folder."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force, protect=[src])  # before the long part, which may take minutes
    sd = load_torch_state_dict(src)
    layout = detect_layout(sd)
    if layout == "classifier":
        arch, args, state = convert_classifier(sd, heads=heads, model=model)
        write_timm_folder(out_dir, arch, args, state, force=force, protect=[src])
        return {"layout": layout, "format": "timm", "architecture": arch, "model_args": args,
                "out_dir": str(out_dir)}
    model_cfg, pp_cfg, state = convert_clipa(sd, heads=heads, text_heads=text_heads, model=model)
    write_open_clip_folder(out_dir, model_cfg, state, pp_cfg, force=force, protect=[src], tokenizer=tokenizer)
    return {"layout": layout, "format": "open_clip", "model_cfg": model_cfg, "out_dir": str(out_dir)}
