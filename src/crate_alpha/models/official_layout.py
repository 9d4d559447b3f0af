"""The released checkpoints' layouts, mapped key by key to this package's models.

As timm keeps a model's checkpoint conversion beside the model (``vision_transformer``'s
``checkpoint_filter_fn`` and ``_load_weights``), the pure state-dict mappings live here:
:class:`~crate_alpha.CrateAlpha` loads the released files with them (timm's
``pretrained_filter_fn`` and ``custom_load``), and :mod:`crate_alpha.convert` builds on
them (model names, head counts, open_clip configs, the text towers, folders).

* the official PyTorch release (``UCSC-VLAA/CRATE-alpha`` ``torch_inference``): the
  classifier (``conv1``, ``transformer.layers.{i}.{0,1}``, ``mlp_head``) and the CLIPA
  model's vision tower (``visual.*``, MSSA's projection stored three times in
  ``nn.MultiheadAttention.in_proj_weight``);
* big_vision's Flax trees, saved as ``/``-joined names in an ``.npz``: conv kernels HWIO,
  dense kernels (in, out), attention projections (d, heads, head_dim), outputs
  (heads, head_dim, d).

Every function checks what it reads and raises :class:`~crate_alpha.errors.ConversionError`
naming the key and the shape it expected.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from ..errors import ConversionError

StateDict = Dict[str, torch.Tensor]
Tree = Dict[str, np.ndarray]

__all__ = [
    "check_names", "check_shape", "official_layout", "classifier_shape", "classifier_state", "clipa_vision_shape",
    "clipa_vision_keys", "clipa_vision_state", "clipa_trunk_state", "load_npz", "crate_tree_state",
    "big_vision_classifier_state",
]


def check_names(present, expected: set, what: str, noun: str = "keys", optional: set = frozenset()) -> None:
    """Refuse a checkpoint with missing or unexpected entries, naming every one."""
    missing = sorted(expected - set(present))
    unexpected = sorted(set(present) - expected - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {noun}: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {noun}: {', '.join(unexpected)}")
        raise ConversionError(f"{what}: " + " | ".join(parts))


def check_shape(entries, key: str, shape: tuple):
    """``entries[key]``, refused with its name when its shape is not ``shape``."""
    a = entries[key]
    if tuple(a.shape) != tuple(shape):
        raise ConversionError(f"{key} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


# --------------------------------------------------------------------------------------
# The official PyTorch release
# --------------------------------------------------------------------------------------

def checked_tensor(sd: StateDict, key: str, ndim: int, layout: str) -> torch.Tensor:
    """``sd[key]``, refused with its shape unless it has ``ndim`` dimensions (read before the full checks)."""
    a = sd.get(key)
    if a is None:
        raise ConversionError(f"missing keys: {key}")
    if a.ndim != ndim:
        raise ConversionError(f"{key} has shape {tuple(a.shape)}; expected {layout}")
    return a


def official_layout(sd: StateDict) -> str:
    """'classifier' or 'clipa': which official PyTorch layout ``sd`` has."""
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "clipa"
    if "conv1.weight" in sd and any(k.startswith("transformer.layers.") for k in sd):
        return "classifier"
    sample = ", ".join(sorted(sd)[:8])
    raise ConversionError(
        "state dict is neither the official CRATE-α classifier layout (conv1.*, transformer.layers.*, "
        "mlp_head.*) nor the official CLIPA layout (visual.*, token_embedding.*, transformer.resblocks.*); "
        f"its first keys are: {sample}")


def block_count(sd: StateDict, pattern: str) -> int:
    """The number of blocks whose keys match ``pattern`` (its group 1 is the block index), contiguous from 0."""
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


def classifier_shape(sd: StateDict) -> dict:
    """width, depth, patch, res of an official classifier state dict (its tensors' ranks checked)."""
    conv = checked_tensor(sd, "conv1.weight", 4, "(width, 3, P, P)")
    pos = checked_tensor(sd, "pos_embedding", 3, "(1, 1 + tokens, width)")
    checked_tensor(sd, "mlp_head.1.weight", 2, "(classes, width)")
    width = conv.shape[0]
    depth = block_count(sd, r"transformer\.layers\.(\d+)\.")
    patch, res = _patch_and_grid(conv, pos.reshape(-1, pos.shape[-1]), "conv1.weight", "pos_embedding")
    return dict(width=width, depth=depth, patch=patch, res=res)


def classifier_state(sd: StateDict, heads: int) -> Tuple[dict, StateDict]:
    """Official classifier state dict -> (shape info with ``heads`` and ``num_classes``, CrateAlpha state dict).

    The head count is not in the weights (MSSA's shared projection has no head axis); it
    only decides whether the output projection may be absent (one head: the official code
    has none, and the identity stands in for it).
    """
    info = classifier_shape(sd)
    width, depth, patch, res = info["width"], info["depth"], info["patch"], info["res"]
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
    return {**info, "heads": heads, "num_classes": num_classes}, out


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


def clipa_vision_shape(sd: StateDict) -> dict:
    """width, depth, patch, res of the vision tower of an official CLIPA state dict."""
    conv = checked_tensor(sd, "visual.conv1.weight", 4, "(width, 3, P, P)")
    depth = block_count(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
    pos = checked_tensor(sd, "visual.positional_embedding", 2, "(1 + tokens, width)")
    patch, res = _patch_and_grid(conv, pos, "visual.conv1.weight", "visual.positional_embedding")
    return dict(width=conv.shape[0], depth=depth, patch=patch, res=res)


def clipa_vision_keys(depth: int) -> set:
    """The keys of an official CLIPA vision tower of ``depth`` blocks."""
    keys = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
            "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    for i in range(depth):
        b = f"visual.transformer.resblocks.{i}"
        keys |= {f"{b}.{n}" for n in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight",
                                      "attn.out_proj.weight", "ln_2.weight", "ln_2.bias",
                                      "mlp.c_fc", "mlp.c_proj")}
    return keys


def clipa_vision_state(sd: StateDict, width: int, depth: int, prefix: str = "") -> StateDict:
    """The official CLIPA vision tower (names already checked) as a CrateAlpha trunk's state dict under ``prefix``.

    The image projection is not a trunk key: it is ``sd["visual.proj"]`` (width, embed),
    applied as ``x @ proj``.
    """
    check_shape(sd, "visual.class_embedding", (width,))
    out = {
        f"{prefix}patch_embed.proj.weight": sd["visual.conv1.weight"],
        # The released vision tower has no patch bias; the timm trunk's is set to zero.
        f"{prefix}patch_embed.proj.bias": torch.zeros(width),
        f"{prefix}cls_token": sd["visual.class_embedding"].reshape(1, 1, width),
        f"{prefix}pos_embed": sd["visual.positional_embedding"][None],
        f"{prefix}norm.weight": sd["visual.ln_post.weight"],
        f"{prefix}norm.bias": sd["visual.ln_post.bias"],
    }
    for i in range(depth):
        b, t = f"visual.transformer.resblocks.{i}", f"{prefix}blocks.{i}"
        out[f"{t}.norm1.weight"] = sd[f"{b}.ln_1.weight"]
        out[f"{t}.norm1.bias"] = sd[f"{b}.ln_1.bias"]
        out[f"{t}.attn.qkv.weight"] = _untie_check(sd[f"{b}.attn.in_proj_weight"], width,
                                                   f"{b}.attn.in_proj_weight")
        out[f"{t}.attn.proj.weight"] = sd[f"{b}.attn.out_proj.weight"]
        out[f"{t}.norm2.weight"] = sd[f"{b}.ln_2.weight"]
        out[f"{t}.norm2.bias"] = sd[f"{b}.ln_2.bias"]
        out[f"{t}.mlp.D"] = check_shape(sd, f"{b}.mlp.c_fc", (width, 4 * width))
        out[f"{t}.mlp.D1"] = check_shape(sd, f"{b}.mlp.c_proj", (width, 4 * width))
    return out


def clipa_trunk_state(sd: StateDict) -> Tuple[dict, StateDict]:
    """An official CLIPA state dict's image tower as a CrateAlpha classifier: (shape info, state dict).

    The image projection becomes the head (``head.weight`` = proj^T, zero bias); the text
    tower is left out.
    """
    info = clipa_vision_shape(sd)
    vision = {k for k in sd if k.startswith("visual.")}
    check_names(vision, clipa_vision_keys(info["depth"]), "official CLIPA state dict")
    out = clipa_vision_state(sd, info["width"], info["depth"])
    proj = checked_tensor(sd, "visual.proj", 2, "(width, embed)")
    check_shape(sd, "visual.proj", (info["width"], proj.shape[1]))
    out["head.weight"], out["head.bias"] = proj.t(), proj.new_zeros(proj.shape[1])
    return {**info, "num_classes": proj.shape[1]}, out


# --------------------------------------------------------------------------------------
# big_vision (JAX) trees
# --------------------------------------------------------------------------------------

SSA = "MultiHeadDotProductSubspaceAttention_0"
ISTA_BLOCK = "OvercompleteISTABlock_0"


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: big_vision's savez stores such arrays as 2-byte void.
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def load_npz(path: os.PathLike) -> Tree:
    """A big_vision ``.npz`` as a flat tree of arrays; a training checkpoint gives its ``params``."""
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


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor of a numeric array."""
    if a.dtype.kind not in "fiu":
        raise ConversionError(f"array of dtype {a.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def tree_depth(tree: Tree, prefix: str) -> int:
    """The number of ``{prefix}Transformer/encoderblock_{i}`` blocks, contiguous from 0."""
    pat = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
    idx = {int(m.group(1)) for k in tree for m in [pat.match(k)] if m}
    if not idx:
        raise ConversionError(f"no transformer blocks under {prefix or 'the root'}Transformer/")
    if idx != set(range(len(idx))):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def layer_norm(tree: Tree, src: str, dst: str, out: dict) -> None:
    """Flax LayerNorm ``src`` (scale, bias) as torch's ``dst`` (weight, bias) in ``out``."""
    out[f"{dst}.weight"] = to_tensor(tree[f"{src}/scale"])
    out[f"{dst}.bias"] = to_tensor(tree[f"{src}/bias"])


def _crate_expected(prefix: str, depth: int) -> set:
    keys = {f"{prefix}{k}" for k in ("cls", "pos_embedding", "embedding/kernel", "encoder_norm/scale",
                                    "encoder_norm/bias", "head/kernel")}
    for i in range(depth):
        b = f"{prefix}Transformer/encoderblock_{i}"
        keys |= {f"{b}/LayerNorm_0/scale", f"{b}/LayerNorm_0/bias", f"{b}/LayerNorm_1/scale",
                 f"{b}/LayerNorm_1/bias", f"{b}/{SSA}/proj/kernel", f"{b}/{SSA}/out/kernel",
                 f"{b}/{ISTA_BLOCK}/D", f"{b}/{ISTA_BLOCK}/D1"}
    return keys


def crate_tree_state(tree: Tree, prefix: str = "", dst: str = ""):
    """A big_vision crate.Model sub-tree -> (shape info, torch state dict with keys under ``dst``, head).

    The head (``weight``, and ``bias`` when the tree has one) is returned apart: a
    classifier's head, or a CLIP image tower's projection.
    """
    depth = tree_depth(tree, prefix)
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
    proj0 = tree[f"{prefix}Transformer/encoderblock_0/{SSA}/proj/kernel"]
    if proj0.ndim != 3 or proj0.shape[0] != width or proj0.shape[1] * proj0.shape[2] != width:
        raise ConversionError(f"{prefix}Transformer/encoderblock_0/{SSA}/proj/kernel has shape {proj0.shape}; "
                              f"expected ({width}, heads, {width} // heads)")
    heads = proj0.shape[1]
    head_k = tree[f"{prefix}head/kernel"]
    if head_k.ndim != 2 or head_k.shape[0] != width:
        raise ConversionError(f"{prefix}head/kernel has shape {head_k.shape}; expected ({width}, classes)")
    n_out = head_k.shape[1]

    out = {
        f"{dst}patch_embed.proj.weight": to_tensor(kernel.transpose(3, 2, 0, 1)),
        f"{dst}patch_embed.proj.bias": (to_tensor(check_shape(tree, f"{prefix}embedding/bias", (width,)))
                                        if f"{prefix}embedding/bias" in tree else torch.zeros(width)),
        f"{dst}cls_token": to_tensor(check_shape(tree, f"{prefix}cls", (1, 1, width))),
        f"{dst}pos_embed": to_tensor(pos),
    }
    layer_norm(tree, f"{prefix}encoder_norm", f"{dst}norm", out)
    for i in range(depth):
        b, t = f"{prefix}Transformer/encoderblock_{i}", f"{dst}blocks.{i}"
        layer_norm(tree, f"{b}/LayerNorm_0", f"{t}.norm1", out)
        layer_norm(tree, f"{b}/LayerNorm_1", f"{t}.norm2", out)
        hd = width // heads
        out[f"{t}.attn.qkv.weight"] = to_tensor(check_shape(tree, f"{b}/{SSA}/proj/kernel", (width, heads, hd))
                                                .reshape(width, width).T)
        out[f"{t}.attn.proj.weight"] = to_tensor(check_shape(tree, f"{b}/{SSA}/out/kernel", (heads, hd, width))
                                                 .reshape(width, width).T)
        out[f"{t}.mlp.D"] = to_tensor(check_shape(tree, f"{b}/{ISTA_BLOCK}/D", (width, 4 * width)))
        out[f"{t}.mlp.D1"] = to_tensor(check_shape(tree, f"{b}/{ISTA_BLOCK}/D1", (width, 4 * width)))
    head = {"weight": to_tensor(head_k.T)}
    if f"{prefix}head/bias" in tree:
        head["bias"] = to_tensor(check_shape(tree, f"{prefix}head/bias", (n_out,)))
    info = dict(width=width, depth=depth, heads=heads, patch=patch, res=side * patch, n_out=n_out)
    return info, out, head


def big_vision_classifier_state(tree: Tree, prefix: str = "") -> Tuple[dict, StateDict]:
    """A big_vision classifier tree -> (shape info, CrateAlpha state dict); a head without bias gets zeros."""
    info, out, head = crate_tree_state(tree, prefix)
    out["head.weight"] = head["weight"]
    out["head.bias"] = head.get("bias", torch.zeros(info["n_out"]))
    return info, out
