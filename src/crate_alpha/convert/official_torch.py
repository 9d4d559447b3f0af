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
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from ..common import read_state_dict
from .folders import ConversionError, check_names, check_out_dir, check_shape, write_open_clip_folder, write_timm_folder
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


def load_torch_state_dict(path: os.PathLike) -> StateDict:
    """Read a plain tensor state dict; anything that needs code to unpickle is refused."""
    return read_state_dict(path, "checkpoint", ConversionError)


def _tensor(sd: StateDict, key: str, ndim: int, layout: str) -> torch.Tensor:
    """``sd[key]``, refused with its shape unless it has ``ndim`` dimensions (read before the full checks)."""
    a = sd.get(key)
    if a is None:
        raise ConversionError(f"missing keys: {key}")
    if a.ndim != ndim:
        raise ConversionError(f"{key} has shape {tuple(a.shape)}; expected {layout}")
    return a


def detect_layout(sd: StateDict) -> str:
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "clipa"
    if "conv1.weight" in sd and any(k.startswith("transformer.layers.") for k in sd):
        return "classifier"
    sample = ", ".join(sorted(sd)[:8])
    raise ConversionError(
        "state dict is neither the official CRATE-α classifier layout (conv1.*, transformer.layers.*, "
        "mlp_head.*) nor the official CLIPA layout (visual.*, token_embedding.*, transformer.resblocks.*); "
        f"its first keys are: {sample}")


def _depth(sd: StateDict, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    if not idx:
        raise ConversionError(f"no transformer blocks found (keys matching {pattern})")
    if idx != set(range(len(idx))):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def _patch_and_grid(conv: torch.Tensor, pos: torch.Tensor, conv_key: str, pos_key: str):
    width, chans, kh, kw = conv.shape
    if kh != kw or chans != 3 or min(width, kh) < 1:
        raise ConversionError(f"{conv_key} has shape {tuple(conv.shape)}; expected (width, 3, P, P)")
    n = pos.shape[-2] - 1
    side = int(round(n ** 0.5))
    if side * side != n or pos.shape[-1] != width:
        raise ConversionError(
            f"{pos_key} has shape {tuple(pos.shape)}; expected 1 + a square number of tokens of width {width}")
    return kh, side * kh


def convert_classifier(sd: StateDict, heads: Optional[int] = None, model: Optional[str] = None):
    """Official classifier state dict -> (architecture, model_args, timm state dict)."""
    conv = _tensor(sd, "conv1.weight", 4, "(width, 3, P, P)")
    pos = _tensor(sd, "pos_embedding", 3, "(1, 1 + tokens, width)")
    _tensor(sd, "mlp_head.1.weight", 2, "(classes, width)")
    width = conv.shape[0]
    depth = _depth(sd, r"transformer\.layers\.(\d+)\.")
    patch, res = _patch_and_grid(conv, pos.reshape(-1, pos.shape[-1]), "conv1.weight", "pos_embedding")
    check_named_shape(model, {"width": width, "depth": depth, "patch": patch, "resolution": res})
    heads = resolve_heads(width, heads, model)
    # heads == 1 with head_dim == width has no output projection in the official code.
    project_out = "transformer.layers.0.0.fn.to_out.0.weight" in sd
    expected = {"conv1.weight", "conv1.bias", "cls_token", "pos_embedding",
                "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"}
    for i in range(depth):
        b = f"transformer.layers.{i}"
        expected |= {f"{b}.0.norm.weight", f"{b}.0.norm.bias", f"{b}.0.fn.qkv.weight",
                     f"{b}.1.norm.weight", f"{b}.1.norm.bias", f"{b}.1.fn.D", f"{b}.1.fn.D1"}
        if project_out or heads != 1:
            expected.add(f"{b}.0.fn.to_out.0.weight")
    check_names(sd, expected, "official classifier state dict")
    num_classes = sd["mlp_head.1.weight"].shape[0]
    check_shape(sd, "cls_token", (1, 1, width))
    check_shape(sd, "pos_embedding", (1, (res // patch) ** 2 + 1, width))
    check_shape(sd, "mlp_head.1.weight", (num_classes, width))

    out = {
        "patch_embed.proj.weight": sd["conv1.weight"],
        "patch_embed.proj.bias": sd["conv1.bias"],
        "cls_token": sd["cls_token"],
        "pos_embed": sd["pos_embedding"],
        "norm.weight": sd["mlp_head.0.weight"],
        "norm.bias": sd["mlp_head.0.bias"],
        "head.weight": sd["mlp_head.1.weight"],
        "head.bias": sd["mlp_head.1.bias"],
    }
    for i in range(depth):
        b, t = f"transformer.layers.{i}", f"blocks.{i}"
        out[f"{t}.norm1.weight"] = sd[f"{b}.0.norm.weight"]
        out[f"{t}.norm1.bias"] = sd[f"{b}.0.norm.bias"]
        out[f"{t}.attn.qkv.weight"] = check_shape(sd, f"{b}.0.fn.qkv.weight", (width, width))
        to_out = sd.get(f"{b}.0.fn.to_out.0.weight")
        out[f"{t}.attn.proj.weight"] = to_out if to_out is not None else torch.eye(width)
        out[f"{t}.norm2.weight"] = sd[f"{b}.1.norm.weight"]
        out[f"{t}.norm2.bias"] = sd[f"{b}.1.norm.bias"]
        out[f"{t}.mlp.D"] = check_shape(sd, f"{b}.1.fn.D", (width, 4 * width))
        out[f"{t}.mlp.D1"] = check_shape(sd, f"{b}.1.fn.D1", (width, 4 * width))
    # The official head LayerNorm is torch's default (eps 1e-5); block norms use 1e-6.
    args = classifier_args(width, depth, heads, patch, res, num_classes, head_norm_eps=1e-5)
    return trunk_name(width, depth, heads, patch, res), args, out


def _untie_check(in_proj: torch.Tensor, width: int, key: str) -> torch.Tensor:
    if tuple(in_proj.shape) != (3 * width, width):
        raise ConversionError(f"{key} has shape {tuple(in_proj.shape)}, expected {(3 * width, width)}")
    q, k, v = in_proj.chunk(3, dim=0)
    if not (torch.equal(q, k) and torch.equal(q, v)):
        raise ConversionError(
            f"{key}: the query, key and value blocks differ, but MSSA uses one projection for all "
            "three; this is not a CRATE-α checkpoint (or its attention was untied) and cannot be "
            "represented by the CRATE-α model")
    return q


def convert_clipa(sd: StateDict, heads: Optional[int] = None, text_heads: Optional[int] = None,
                  model: Optional[str] = None):
    """Official CLIPA state dict -> (open_clip model_cfg, preprocess_cfg, open_clip state dict)."""
    conv = _tensor(sd, "visual.conv1.weight", 4, "(width, 3, P, P)")
    width = conv.shape[0]
    depth = _depth(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
    text_layers = _depth(sd, r"transformer\.resblocks\.(\d+)\.")
    pos = _tensor(sd, "visual.positional_embedding", 2, "(1 + tokens, width)")
    patch, res = _patch_and_grid(conv, pos, "visual.conv1.weight", "visual.positional_embedding")
    expected = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
                "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                "text_projection", "logit_scale"}
    for i in range(depth):
        b = f"visual.transformer.resblocks.{i}"
        expected |= {f"{b}.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight",
                                          "attn.out_proj.weight", "ln_2.weight", "ln_2.bias",
                                          "mlp.c_fc", "mlp.c_proj")}
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
        _tensor(sd, key, ndim, layout)
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

    out = {
        "visual.trunk.patch_embed.proj.weight": sd["visual.conv1.weight"],
        # The released vision tower has no patch bias; the timm trunk's is set to zero.
        "visual.trunk.patch_embed.proj.bias": torch.zeros(width),
        "visual.trunk.cls_token": sd["visual.class_embedding"].reshape(1, 1, width),
        "visual.trunk.pos_embed": sd["visual.positional_embedding"][None],
        "visual.trunk.norm.weight": sd["visual.ln_post.weight"],
        "visual.trunk.norm.bias": sd["visual.ln_post.bias"],
        "visual.head.proj.weight": sd["visual.proj"].t(),
        "token_embedding.weight": sd["token_embedding.weight"],
        "positional_embedding": sd["positional_embedding"],
        "ln_final.weight": sd["ln_final.weight"],
        "ln_final.bias": sd["ln_final.bias"],
        "text_projection": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    for i in range(depth):
        b, t = f"visual.transformer.resblocks.{i}", f"visual.trunk.blocks.{i}"
        out[f"{t}.norm1.weight"] = sd[f"{b}.ln_1.weight"]
        out[f"{t}.norm1.bias"] = sd[f"{b}.ln_1.bias"]
        out[f"{t}.attn.qkv.weight"] = _untie_check(sd[f"{b}.attn.in_proj_weight"], width,
                                                   f"{b}.attn.in_proj_weight")
        out[f"{t}.attn.proj.weight"] = sd[f"{b}.attn.out_proj.weight"]
        out[f"{t}.norm2.weight"] = sd[f"{b}.ln_2.weight"]
        out[f"{t}.norm2.bias"] = sd[f"{b}.ln_2.bias"]
        out[f"{t}.mlp.D"] = check_shape(sd, f"{b}.mlp.c_fc", (width, 4 * width))
        out[f"{t}.mlp.D1"] = check_shape(sd, f"{b}.mlp.c_proj", (width, 4 * width))
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
