"""Released JAX (big_vision) CRATE-α checkpoints to timm / open_clip folders.

The official TPU code saves Flax parameter trees flattened to ``/``-joined names in an
``.npz``: bare trees as published, or training checkpoints with ``params/...`` beside
``opt/...`` and ``chrono/...`` (ignored here). Flax layouts differ from torch's: conv
kernels are HWIO, dense kernels (in, out), attention projections (d, heads, head_dim) and
outputs (heads, head_dim, d); LayerNorms use eps 1e-6 throughout. Head counts are read
from the attention kernel shapes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..models.official_layout import SSA as _SSA
from ..models.official_layout import (
    big_vision_classifier_state,
    check_names,
    check_shape,
    crate_tree_state,
    load_npz,
)
from ..models.official_layout import layer_norm as _ln
from ..models.official_layout import to_tensor as _t
from ..models.official_layout import tree_depth as _depth
from .folders import ConversionError, check_out_dir, write_open_clip_folder, write_timm_folder
from .targets import classifier_args, clipa_model_cfg, clipa_preprocess_cfg, trunk_name

# The CRATE-α trees are read by the model layer (models/official_layout.py, which CrateAlpha
# loads released .npz files with); this module adds the CLIPA text tower, configs and folders.
__all__ = ["convert_big_vision", "convert_classifier", "convert_two_towers", "detect_layout", "load_npz",
           "split_src"]

Tree = Dict[str, np.ndarray]
_MHA = "MultiHeadDotProductAttention_0"


def split_src(src: str) -> Tuple[Path, Optional[str]]:
    """``file.npz`` or ``file.npz:img`` (a sub-tree) -> (path, subtree)."""
    path = Path(src)
    if not path.exists() and ":" in str(src):
        head, sub = str(src).rsplit(":", 1)
        return Path(head), sub or None
    return path, None


def convert_classifier(tree: Tree, prefix: str = ""):
    info, out = big_vision_classifier_state(tree, prefix)
    args = classifier_args(info["width"], info["depth"], info["heads"], info["patch"], info["res"],
                           info["n_out"], head_norm_eps=1e-6)
    return trunk_name(info["width"], info["depth"], info["heads"], info["patch"], info["res"]), args, out


def convert_two_towers(tree: Tree):
    info, out, head = crate_tree_state(tree, "img/", "visual.trunk.")
    if "bias" in head:
        raise ConversionError("img/head/bias: the CLIP image projection has no bias in open_clip's tower")
    out["visual.head.proj.weight"] = head["weight"]
    embed = info["n_out"]

    depth = _depth(tree, "txt/")
    expected = {"t", "txt/Embed_0/embedding", "txt/pos_embedding", "txt/encoder_norm/scale",
                "txt/encoder_norm/bias", "txt/head/kernel"}
    for i in range(depth):
        b = f"txt/Transformer/encoderblock_{i}"
        expected |= {f"{b}/LayerNorm_{j}/{p}" for j in (0, 1) for p in ("scale", "bias")}
        expected |= {f"{b}/{_MHA}/{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")}
        expected |= {f"{b}/MlpBlock_0/Dense_{j}/{p}" for j in (0, 1) for p in ("kernel", "bias")}
    img_keys = {k for k in tree if k.startswith("img/")}
    check_names(tree, expected | img_keys, "big_vision two-towers parameters", "parameters")

    emb = tree["txt/Embed_0/embedding"]
    if emb.ndim != 2 or min(emb.shape) < 1:
        raise ConversionError(f"txt/Embed_0/embedding has shape {emb.shape}; expected (vocab, width)")
    vocab, tw = emb.shape
    pos = tree["txt/pos_embedding"]
    if pos.ndim != 3 or pos.shape[2] != tw:
        raise ConversionError(f"txt/pos_embedding has shape {pos.shape}; expected (1, context, {tw})")
    context = pos.shape[1]
    q0 = tree[f"txt/Transformer/encoderblock_0/{_MHA}/query/kernel"]
    if q0.ndim != 3 or q0.shape[0] != tw or q0.shape[1] * q0.shape[2] != tw:
        raise ConversionError(f"txt/Transformer/encoderblock_0/{_MHA}/query/kernel has shape {q0.shape}; "
                              f"expected ({tw}, heads, {tw} // heads)")
    th = q0.shape[1]
    dense0 = tree["txt/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
    if dense0.ndim != 2:
        raise ConversionError(f"txt/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel has shape {dense0.shape}; "
                              f"expected ({tw}, hidden)")
    hidden = dense0.shape[1]
    out.update({
        "token_embedding.weight": _t(tree["txt/Embed_0/embedding"]),
        "positional_embedding": _t(pos[0]),
        # big_vision applies x @ kernel, as open_clip applies x @ text_projection.
        "text_projection": _t(check_shape(tree, "txt/head/kernel", (tw, embed))),
        "logit_scale": _t(check_shape(tree, "t", (1,))).reshape(()),
    })
    _ln(tree, "txt/encoder_norm", "ln_final", out)
    for i in range(depth):
        b, t = f"txt/Transformer/encoderblock_{i}", f"transformer.resblocks.{i}"
        _ln(tree, f"{b}/LayerNorm_0", f"{t}.ln_1", out)
        _ln(tree, f"{b}/LayerNorm_1", f"{t}.ln_2", out)
        qkv = [check_shape(tree, f"{b}/{_MHA}/{n}/kernel", (tw, th, tw // th)).reshape(tw, tw).T
               for n in ("query", "key", "value")]
        bias = [check_shape(tree, f"{b}/{_MHA}/{n}/bias", (th, tw // th)).reshape(tw) for n in ("query", "key", "value")]
        out[f"{t}.attn.in_proj_weight"] = _t(np.concatenate(qkv, 0))
        out[f"{t}.attn.in_proj_bias"] = _t(np.concatenate(bias, 0))
        out[f"{t}.attn.out_proj.weight"] = _t(check_shape(tree, f"{b}/{_MHA}/out/kernel", (th, tw // th, tw))
                                              .reshape(tw, tw).T)
        out[f"{t}.attn.out_proj.bias"] = _t(check_shape(tree, f"{b}/{_MHA}/out/bias", (tw,)))
        out[f"{t}.mlp.c_fc.weight"] = _t(check_shape(tree, f"{b}/MlpBlock_0/Dense_0/kernel", (tw, hidden)).T)
        out[f"{t}.mlp.c_fc.bias"] = _t(check_shape(tree, f"{b}/MlpBlock_0/Dense_0/bias", (hidden,)))
        out[f"{t}.mlp.c_proj.weight"] = _t(check_shape(tree, f"{b}/MlpBlock_0/Dense_1/kernel", (hidden, tw)).T)
        out[f"{t}.mlp.c_proj.bias"] = _t(check_shape(tree, f"{b}/MlpBlock_0/Dense_1/bias", (tw,)))

    vision = trunk_name(info["width"], info["depth"], info["heads"], info["patch"], info["res"])
    cfg = clipa_model_cfg(embed, vision, info["res"], vocab, context, tw, th, depth, text_mlp_ratio=hidden / tw)
    return cfg, clipa_preprocess_cfg(info["res"]), out


def detect_layout(tree: Tree) -> str:
    if any(k.startswith("img/") for k in tree) and any(k.startswith("txt/") for k in tree):
        return "two_towers"
    if any(k.startswith(f"Transformer/encoderblock_0/{_SSA}/") for k in tree):
        return "classifier"
    raise ConversionError(
        "unknown layout: expected a big_vision CRATE-α classifier (Transformer/encoderblock_*/"
        f"{_SSA}/...) or a two-towers CLIPA tree (img/..., txt/..., t); first keys: "
        + ", ".join(sorted(tree)[:8]))


def convert_big_vision(src: str, out_dir: os.PathLike, force: bool = False,
                       tokenizer: Optional[os.PathLike] = None) -> dict:
    """Convert a big_vision ``.npz`` (``file.npz`` or ``file.npz:img``) to a model folder."""
    out_dir = Path(out_dir)
    path, sub = split_src(str(src))
    check_out_dir(out_dir, force, protect=[path])  # before the long part, which may take minutes
    tree = load_npz(path)
    if sub is not None:
        if sub != "img":
            raise ConversionError(f"unknown sub-tree {sub!r}: only ':img' (the image tower) can be converted alone")
        if detect_layout(tree) != "two_towers":
            raise ConversionError(f"{path} is not a two-towers checkpoint; ':img' needs img/... parameters")
        tree = {k[len("img/"):]: v for k, v in tree.items() if k.startswith("img/")}
        layout = "image_tower"
    else:
        layout = detect_layout(tree)
    if layout in ("classifier", "image_tower"):
        arch, args, state = convert_classifier(tree)
        write_timm_folder(out_dir, arch, args, state, force=force, protect=[path])
        return {"layout": layout, "format": "timm", "architecture": arch, "model_args": args,
                "out_dir": str(out_dir)}
    cfg, pp, state = convert_two_towers(tree)
    write_open_clip_folder(out_dir, cfg, state, pp, force=force, protect=[path], tokenizer=tokenizer)
    return {"layout": layout, "format": "open_clip", "model_cfg": cfg, "out_dir": str(out_dir)}
