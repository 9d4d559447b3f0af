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
import re
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .folders import ConversionError, check_names, check_out_dir, check_shape, write_open_clip_folder, write_timm_folder
from .targets import classifier_args, clipa_model_cfg, clipa_preprocess_cfg, trunk_name

Tree = Dict[str, np.ndarray]
_SSA = "MultiHeadDotProductSubspaceAttention_0"
_ISTA = "OvercompleteISTABlock_0"
_MHA = "MultiHeadDotProductAttention_0"


def split_src(src: str) -> Tuple[Path, Optional[str]]:
    """``file.npz`` or ``file.npz:img`` (a sub-tree) -> (path, subtree)."""
    path = Path(src)
    if not path.exists() and ":" in str(src):
        head, sub = str(src).rsplit(":", 1)
        return Path(head), sub or None
    return path, None


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: big_vision's savez stores such arrays as 2-byte void.
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def load_npz(path: os.PathLike) -> Tree:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            tree = {}
            for k in z.files:
                a = z[k]
                if not isinstance(a, np.ndarray):  # numpy hands back any non-.npy member as raw bytes
                    raise ConversionError(
                        f"{path} is a zip archive but not an .npz of arrays: member {k!r} is not a .npy array")
                if a.dtype.kind == "V" and a.dtype.itemsize == 2:
                    a = _bf16_to_f32(a)
                tree[k] = a
    except ConversionError:
        raise
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise ConversionError(f"{path} is not a readable .npz file: {e}") from None
        raise ConversionError(
            f"{path} holds pickled objects, which are refused (loaded with allow_pickle=False): {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConversionError(f"{path} is not a readable .npz file: {e}") from None
    if any(k.startswith("params/") for k in tree):
        # A training checkpoint: {"params": ..., "opt": ..., "chrono": ...}.
        tree = {k[len("params/"):]: v for k, v in tree.items() if k.startswith("params/")}
    return tree


def _t(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind not in "fiu":
        raise ConversionError(f"array of dtype {a.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _depth(tree: Tree, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
    idx = {int(m.group(1)) for k in tree for m in [pat.match(k)] if m}
    if not idx:
        raise ConversionError(f"no transformer blocks under {prefix or 'the root'}Transformer/")
    if idx != set(range(len(idx))):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def _ln(tree: Tree, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = _t(tree[f"{src}/scale"])
    out[f"{dst}.bias"] = _t(tree[f"{src}/bias"])


def _crate_expected(prefix: str, depth: int) -> set:
    keys = {f"{prefix}{k}" for k in ("cls", "pos_embedding", "embedding/kernel", "encoder_norm/scale",
                                    "encoder_norm/bias", "head/kernel")}
    for i in range(depth):
        b = f"{prefix}Transformer/encoderblock_{i}"
        keys |= {f"{b}/LayerNorm_0/scale", f"{b}/LayerNorm_0/bias", f"{b}/LayerNorm_1/scale",
                 f"{b}/LayerNorm_1/bias", f"{b}/{_SSA}/proj/kernel", f"{b}/{_SSA}/out/kernel",
                 f"{b}/{_ISTA}/D", f"{b}/{_ISTA}/D1"}
    return keys


def convert_crate_tree(tree: Tree, prefix: str = "", dst: str = ""):
    """A crate.Model sub-tree -> (shape info, torch state dict with keys under ``dst``)."""
    depth = _depth(tree, prefix)
    expected = _crate_expected(prefix, depth)
    check_names([k for k in tree if k.startswith(prefix)], expected,
                "big_vision CRATE-α parameters" + (f" under {prefix}" if prefix else ""), "parameters",
                optional={f"{prefix}embedding/bias", f"{prefix}head/bias"})
    kernel = tree[f"{prefix}embedding/kernel"]
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3 or min(kernel.shape) < 1:
        raise ConversionError(f"{prefix}embedding/kernel has shape {kernel.shape}; expected (P, P, 3, width)")
    patch, width = kernel.shape[0], kernel.shape[3]
    pos = tree[f"{prefix}pos_embedding"]
    n = pos.shape[1] - 1 if pos.ndim == 3 else -1
    side = int(round(max(n, 0) ** 0.5))
    if pos.ndim != 3 or side * side != n or pos.shape[2] != width:
        raise ConversionError(f"{prefix}pos_embedding has shape {pos.shape}; expected (1, 1 + a square, {width})")
    proj0 = tree[f"{prefix}Transformer/encoderblock_0/{_SSA}/proj/kernel"]
    if proj0.ndim != 3 or proj0.shape[0] != width or proj0.shape[1] * proj0.shape[2] != width:
        raise ConversionError(f"{prefix}Transformer/encoderblock_0/{_SSA}/proj/kernel has shape {proj0.shape}; "
                              f"expected ({width}, heads, {width} // heads)")
    heads = proj0.shape[1]
    head_k = tree[f"{prefix}head/kernel"]
    if head_k.ndim != 2 or head_k.shape[0] != width:
        raise ConversionError(f"{prefix}head/kernel has shape {head_k.shape}; expected ({width}, classes)")
    n_out = head_k.shape[1]

    out = {
        f"{dst}patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
        f"{dst}patch_embed.proj.bias": (_t(check_shape(tree, f"{prefix}embedding/bias", (width,)))
                                        if f"{prefix}embedding/bias" in tree else torch.zeros(width)),
        f"{dst}cls_token": _t(check_shape(tree, f"{prefix}cls", (1, 1, width))),
        f"{dst}pos_embed": _t(pos),
    }
    _ln(tree, f"{prefix}encoder_norm", f"{dst}norm", out)
    for i in range(depth):
        b, t = f"{prefix}Transformer/encoderblock_{i}", f"{dst}blocks.{i}"
        _ln(tree, f"{b}/LayerNorm_0", f"{t}.norm1", out)
        _ln(tree, f"{b}/LayerNorm_1", f"{t}.norm2", out)
        hd = width // heads
        out[f"{t}.attn.qkv.weight"] = _t(check_shape(tree, f"{b}/{_SSA}/proj/kernel", (width, heads, hd))
                                         .reshape(width, width).T)
        out[f"{t}.attn.proj.weight"] = _t(check_shape(tree, f"{b}/{_SSA}/out/kernel", (heads, hd, width))
                                          .reshape(width, width).T)
        out[f"{t}.mlp.D"] = _t(check_shape(tree, f"{b}/{_ISTA}/D", (width, 4 * width)))
        out[f"{t}.mlp.D1"] = _t(check_shape(tree, f"{b}/{_ISTA}/D1", (width, 4 * width)))
    head = {"weight": _t(head_k.T)}
    if f"{prefix}head/bias" in tree:
        head["bias"] = _t(check_shape(tree, f"{prefix}head/bias", (n_out,)))
    info = dict(width=width, depth=depth, heads=heads, patch=patch, res=side * patch, n_out=n_out)
    return info, out, head


def convert_classifier(tree: Tree, prefix: str = ""):
    info, out, head = convert_crate_tree(tree, prefix)
    out["head.weight"] = head["weight"]
    out["head.bias"] = head.get("bias", torch.zeros(info["n_out"]))
    args = classifier_args(info["width"], info["depth"], info["heads"], info["patch"], info["res"],
                           info["n_out"], head_norm_eps=1e-6)
    return trunk_name(info["width"], info["depth"], info["heads"], info["patch"], info["res"]), args, out


def convert_two_towers(tree: Tree):
    info, out, head = convert_crate_tree(tree, "img/", "visual.trunk.")
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
