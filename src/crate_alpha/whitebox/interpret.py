"""Looking inside white-box encoders: attention maps, PCA colours, MaskCut, per-layer objectives.

CRATE-α is built so that each layer has a meaning: MSSA compresses the tokens against
per-head subspaces U_k, ODL sparsifies them against an overcomplete dictionary D. This
module measures those meanings and draws the pictures of the CRATE papers:

* :func:`attention` — class-token attention over the patch grid, per layer and head;
* :func:`pca_features` — the first three principal components of the last layer's patch
  features as RGB, and the foreground they reveal;
* :func:`maskcut` — CutLER's MaskCut (normalised cuts on the patch affinity graph) on the
  last layer's subspace projections; its graph-cut core is :func:`ncut_bipartition` and
  :func:`maskcut_from_features`, pure functions of features or affinities;
* :func:`coarse_segmentation` — DINO's rule: the patches holding a share of a head's
  class-token attention, merged over heads;
* :func:`layer_diagnostics` — per layer, the coding rate of the tokens against the
  subspaces, the sparsity of the sparse code and the dictionary's reconstruction error.

One forward walker, :func:`trace`, feeds all of them. It walks ``model.blocks`` itself,
so any input size whose sides are multiples of the patch size works (the position
embedding is resampled to the image's grid), and it records each block's intermediate
tensors through hooks on the block's ``attn`` and ``mlp``, so the block's own forward
(residual or not) is what runs.

The blocks' operators are asked what they compute (the protocol of
:mod:`crate_alpha.models.layers`), never recognised by the shapes of their weights:

* the attention (``blk.attn``) gives ``subspace_features(x)``: the per-head projections
  U_k^T z of its input, (B, heads, N, p), and optionally ``attention_map(x)``: the
  (B, heads, N, N) attention probabilities (needed by :func:`attention` and
  :func:`coarse_segmentation` only);
* the sparse-coding step (``blk.mlp``) gives ``sparse_code(x)``: its (B, N, K) code, and
  optionally ``reconstruct(z)``: the dictionary's synthesis D z of its input (for
  :func:`dictionary_error`).

``x`` is the operator's own input (after the block's norm). CRATE-α's MSSA and ODL and
CRATE's ISTA implement it, and so does any new operator that has these methods. timm's
plain ViT blocks are read through a small adapter for timm's ``Attention`` and ``Mlp``
classes: the *keys* stand in for the subspace projections (as DINO and CutLER use them),
the MLP's hidden activations for the code, and there is no dictionary.

Every function takes ``images`` as a float tensor (B, 3, H, W) already normalised for the
model, and as ``model`` anything :func:`encoder` accepts. Results come back on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp

from ..common import CrateAlphaError, folder_kind, model_folder
from ..errors import WhiteboxError

__all__ = [
    "BlockTrace", "Trace", "encoder", "trace", "attention", "pca_features", "maskcut", "ncut_bipartition",
    "maskcut_from_features", "coarse_segmentation", "layer_diagnostics", "sparse_code", "coding_rate",
    "code_sparsity", "dictionary_error", "CODING_RATE_EPS",
]

CODING_RATE_EPS = 0.01   # ε of R(Z) in the CRATE release's coding-rate measurement
CORNER_FLIP = 3          # MaskCut: a foreground holding this many of the 4 grid corners is background (CutLER)
MIN_MASK_SHARE = 0.01    # MaskCut: a later mask of at most this share of the grid ends the search (CutLER)


# --------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------

def _is_encoder(m) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "patch_embed") and hasattr(m, "blocks")


def _from_folder(folder: Path) -> nn.Module:
    import open_clip
    import timm

    if folder_kind(folder) == "open_clip":
        return open_clip.create_model(f"local-dir:{folder}").visual
    return timm.create_model(f"local-dir:{folder}", pretrained=True)


def _from_string(spec: str) -> nn.Module:
    import open_clip
    import timm

    folder = model_folder(spec)
    if folder is not None:
        return _from_folder(folder)
    name = spec.split(".")[0]
    if timm.is_model(name):
        return timm.create_model(spec, pretrained=False)
    if spec in open_clip.list_models():
        # An untrained open_clip config (e.g. "crate-alpha-demo"): its image tower.
        return open_clip.create_model(spec).visual
    raise CrateAlphaError(f"{spec!r} is not a folder, a local-dir: folder, a timm model name or an open_clip "
                          "config name")


def encoder(model) -> nn.Module:
    """The timm image encoder behind ``model``, in eval mode.

    Accepts a timm CRATE-α / CRATE / ViT module; an open_clip CLIP model (its
    ``visual.trunk``) or its ``visual`` tower (its ``trunk``); or a string: a
    ``local-dir:FOLDER`` or a bare folder path (``open_clip_config.json`` -> open_clip,
    ``config.json`` -> timm with the folder's weights), a timm model name or an open_clip
    config name (both untrained). Anything else raises ``ValueError``.
    """
    if isinstance(model, Path):
        m = _from_folder(model_folder(f"local-dir:{model}"))
    elif isinstance(model, str):
        m = _from_string(model)
    else:
        m = model
    if isinstance(m, nn.Module) and not _is_encoder(m):
        if hasattr(m, "visual"):
            m = m.visual
        if hasattr(m, "trunk"):
            m = m.trunk
    if not _is_encoder(m):
        what = type(m).__name__
        raise WhiteboxError(f"cannot find a timm vision transformer in {what}: expected a timm model with patch_embed "
                         "and blocks, an open_clip model with a timm tower (visual.trunk), or a string naming one "
                         "(open_clip's own VisionTransformer tower is not supported)")
    for i, blk in enumerate(m.blocks):
        if not (hasattr(blk, "attn") and hasattr(blk, "mlp")):
            raise WhiteboxError(f"block {i} of {type(m).__name__} has no attn / mlp: not a ViT-style encoder")
        if _attention_view(blk.attn) is None:
            raise WhiteboxError(f"block {i}'s attention {type(blk.attn).__name__} has no subspace_features(x) and is "
                             "not timm's Attention: interpret cannot read its subspaces")
    return m.eval()


# --------------------------------------------------------------------------------------
# The operators, as interpret asks them
# --------------------------------------------------------------------------------------

class _TimmAttention:
    """timm's ``Attention`` in the operator protocol: its keys are the subspace features."""

    def __init__(self, attn: TimmAttention) -> None:
        self.attn = attn

    def _queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = self.attn
        B, N, _ = x.shape
        q, k, _ = a.qkv(x).view(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return a.q_norm(q), a.k_norm(k)

    def subspace_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._queries_keys(x)[1]

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self._queries_keys(x)
        return ((q.float() * self.attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)


class _TimmMlp:
    """timm's ``Mlp`` in the operator protocol: its hidden activations are the code (no dictionary)."""

    def __init__(self, mlp: TimmMlp) -> None:
        self.mlp = mlp

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.act(self.mlp.fc1(x))


def _protocol_view(module: nn.Module, method: str, timm_type: type, adapter):
    """``module`` itself when it speaks the protocol (has ``method``), timm's ``timm_type`` through
    its ``adapter``, else None."""
    if hasattr(module, method):
        return module
    if isinstance(module, timm_type):
        return adapter(module)
    return None


def _attention_view(attn: nn.Module):
    return _protocol_view(attn, "subspace_features", TimmAttention, _TimmAttention)


def _coding_view(mlp: nn.Module):
    return _protocol_view(mlp, "sparse_code", TimmMlp, _TimmMlp)


def _kind(mlp: nn.Module) -> str:
    view = _coding_view(mlp)
    return "mlp" if view is None or isinstance(view, _TimmMlp) else type(mlp).__name__.lower()


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(module.parameters(), None)
    return default if p is None else p.dtype


# --------------------------------------------------------------------------------------
# The forward walker
# --------------------------------------------------------------------------------------

@dataclass
class BlockTrace:
    """What one block saw and produced (float32; B images, N tokens, d width).

    x: (B, N, d) the block's input tokens.
    attn_in: (B, N, d) the tokens entering attention (norm1 of x).
    features: (B, heads, N, p) the attention's ``subspace_features``: per-head subspace
        projections U_k^T z (CRATE), or the keys (timm ViT).
    attn: (B, heads, N, N) attention probabilities, or None when not requested (or the
        attention gives no ``attention_map``).
    attn_out: (B, N, d) the attention branch's output (before layer scale and residual).
    mlp_in: (B, N, d) the tokens entering the MLP / ODL / ISTA (norm2 of the mid stream).
    code: (B, N, K) the MLP step's ``sparse_code``: ODL's z2, ISTA's z, or a timm MLP's
        hidden activations; None when not requested (or the MLP gives no code).
    kind: the sparse-coding operator's class name in lower case ("odl", "ista", ...), or
        "mlp" for an MLP that is not one (timm's).
    out: (B, N, d) the block's output tokens.
    """

    x: torch.Tensor
    attn_in: torch.Tensor
    features: torch.Tensor
    attn: Optional[torch.Tensor]
    attn_out: torch.Tensor
    mlp_in: torch.Tensor
    code: Optional[torch.Tensor]
    kind: str
    out: torch.Tensor


@dataclass
class Trace:
    """One walk through an encoder.

    blocks: one :class:`BlockTrace` per block (None for blocks not recorded).
    output: (B, N, d) the last block's output after ``model.norm`` (= ``forward_features``).
    grid: (gh, gw) the patch grid of the images.
    num_prefix_tokens: class and register tokens before the patches.
    class_token: whether token 0 is a class token.
    """

    blocks: List[Optional[BlockTrace]]
    output: torch.Tensor
    grid: Tuple[int, int]
    num_prefix_tokens: int
    class_token: bool

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens of a (B, N, ...) tensor."""
        return tokens[:, self.num_prefix_tokens:]


def _prefix(enc: nn.Module) -> Tuple[int, bool]:
    has_cls = getattr(enc, "cls_token", None) is not None
    reg = getattr(enc, "reg_token", None)
    default = int(has_cls) + (reg.shape[1] if reg is not None else 0)
    return int(getattr(enc, "num_prefix_tokens", default)), has_cls


def _pos_embed_for(enc: nn.Module, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
    pos = getattr(enc, "pos_embed", None)
    if pos is None:
        return None
    native = tuple(enc.patch_embed.grid_size)
    if tuple(grid) == native:
        return pos
    n_prefix, _ = _prefix(enc)
    embed_prefix = 0 if getattr(enc, "no_embed_class", False) else n_prefix
    if getattr(enc, "pos_embed_type", None) == "sincos":
        # A fixed sin-cos embedding is regenerated at the new grid, as CrateAlpha.set_input_size does.
        from ..models.layers import sincos_2d_pos_embed

        pe = sincos_2d_pos_embed(grid, pos.shape[-1]).to(pos)
        return torch.cat([pos.new_zeros(embed_prefix, pos.shape[-1]), pe], dim=0)[None]
    from timm.layers import resample_abs_pos_embed

    # timm's own interpolation for dynamic_img_size, so a model built with that flag gives the same tokens.
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(native), num_prefix_tokens=embed_prefix)


def _embed(enc: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Patch embedding, prefix tokens and positions at the images' own grid (timm's order)."""
    pe = enc.patch_embed
    # The patch embedding's own forward (CRATE's is not a convolution), with its check for the
    # native size switched off for this call: the caller has checked divisibility.
    strict = getattr(pe, "strict_img_size", None)
    if strict:
        pe.strict_img_size = False
    try:
        x = pe(images)
    finally:
        if strict:
            pe.strict_img_size = strict
    if x.ndim == 4:  # a grid: NHWC (timm's dynamic_img_size) or NCHW
        fmt = getattr(pe, "output_fmt", "NHWC")
        if getattr(fmt, "value", fmt) == "NCHW":
            x = x.permute(0, 2, 3, 1)
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        ph, pw = (int(s) for s in pe.patch_size)
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    to_cat = [t.expand(x.shape[0], -1, -1) for t in (getattr(enc, "cls_token", None), getattr(enc, "reg_token", None))
              if t is not None]
    pos = _pos_embed_for(enc, grid)
    if pos is not None and getattr(enc, "no_embed_class", False):
        x = torch.cat(to_cat + [x + pos], dim=1)
    else:
        x = torch.cat(to_cat + [x], dim=1)
        if pos is not None:
            x = x + pos
    for name in ("pos_drop", "patch_drop", "norm_pre"):
        x = getattr(enc, name, nn.Identity())(x)
    return x, grid


def _check_images(enc: nn.Module, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise WhiteboxError("images must be a float tensor (B, C, H, W) normalised for the model")
    ph, pw = (int(s) for s in enc.patch_embed.patch_size)
    H, W = images.shape[-2:]
    if H % ph or W % pw or H < ph or W < pw:
        raise WhiteboxError(f"image size {H}x{W} is not a positive multiple of the patch size {ph}x{pw}")
    return images


def _attention_parts(attn: nn.Module, z: torch.Tensor, with_attention: bool):
    """(per-head features, attention probabilities or None) of an attention module on its input z."""
    view = _attention_view(attn)
    probs = None
    if with_attention and hasattr(view, "attention_map"):
        probs = view.attention_map(z).float()
    return view.subspace_features(z).float(), probs


@torch.no_grad()
def sparse_code(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sparse code the block's sparse-coding step ``mlp`` computes from its input x.

    The operator's own ``sparse_code(x)``: CRATE-α's ODL gives z2, CRATE's ISTA its output
    z (see :mod:`crate_alpha.models.layers`); x is the operator's input (after norm2). A
    timm ``Mlp`` gives its hidden activations.
    """
    view = _coding_view(mlp)
    if view is None:
        raise WhiteboxError(f"{type(mlp).__name__} is not a sparse-coding operator (it has no sparse_code(x))")
    return view.sparse_code(x)


def _hook(store: dict, key: str):
    def grab(module, args, kwargs, output):
        store[key + "_in"] = args[0] if args else next(iter(kwargs.values()))
        store[key + "_out"] = output
    return grab


def _record(blk: nn.Module, x: torch.Tensor, out: torch.Tensor, got: dict, with_attention: bool,
            with_code: bool) -> BlockTrace:
    for key in ("attn_in", "mlp_in"):
        if key not in got:
            raise WhiteboxError(f"{type(blk).__name__} did not call its {key[:-3]} in forward")
    features, probs = _attention_parts(blk.attn, got["attn_in"], with_attention)
    view = _coding_view(blk.mlp)
    code = view.sparse_code(got["mlp_in"]) if with_code and view is not None else None
    return BlockTrace(
        x=x.float(), attn_in=got["attn_in"].float(), features=features, attn=probs,
        attn_out=got["attn_out"].float(), mlp_in=got["mlp_in"].float(),
        code=None if code is None else code.float(), kind=_kind(blk.mlp), out=out.float(),
    )


def _layer_index(layer: int, depth: int) -> int:
    if not -depth <= layer < depth:
        raise WhiteboxError(f"layer {layer} does not exist: the model has {depth} blocks")
    return layer % depth


@torch.no_grad()
def trace(model, images: torch.Tensor, layers: Optional[Sequence[int]] = None, with_attention: bool = True,
          with_code: bool = True) -> Trace:
    """Walk the encoder block by block and record what each block saw (see :class:`BlockTrace`).

    Works at any image size whose sides are multiples of the patch size: the position
    embedding is resampled to the image's grid (timm's ``resample_abs_pos_embed``; a
    CRATE-α sin-cos embedding is regenerated instead). At the native size the last
    output equals ``model.forward_features(images)``. ``layers`` (0-based, negatives
    count from the end) limits which blocks are recorded; ``with_attention=False`` skips
    the (B, heads, N, N) attention matrices and ``with_code=False`` the sparse codes. Runs
    in eval mode, without autocast.
    """
    enc = encoder(model)
    param = next(enc.parameters())
    images = _check_images(enc, images).to(param.device, param.dtype)
    depth = len(enc.blocks)
    wanted = set(range(depth)) if layers is None else {_layer_index(i, depth) for i in layers}
    n_prefix, has_cls = _prefix(enc)
    with torch.autocast(device_type=param.device.type, enabled=False):
        x, grid = _embed(enc, images)
        records: List[Optional[BlockTrace]] = []
        for i, blk in enumerate(enc.blocks):
            if i not in wanted:
                x = blk(x)
                records.append(None)
                continue
            got: dict = {}
            handles = [blk.attn.register_forward_hook(_hook(got, "attn"), with_kwargs=True),
                       blk.mlp.register_forward_hook(_hook(got, "mlp"), with_kwargs=True)]
            try:
                out = blk(x)
            finally:
                for h in handles:
                    h.remove()
            records.append(_record(blk, x, out, got, with_attention, with_code))
            x = out
        output = getattr(enc, "norm", nn.Identity())(x).float()
    return Trace(blocks=records, output=output, grid=grid, num_prefix_tokens=n_prefix, class_token=has_cls)


# --------------------------------------------------------------------------------------
# Attention maps and coarse segmentation
# --------------------------------------------------------------------------------------

def _query_rows(tr: Trace, probs: torch.Tensor) -> torch.Tensor:
    """(B, heads, gh, gw): the class token's attention to the patches, or the mean over queries."""
    rows = probs[:, :, 0] if tr.class_token else probs.mean(dim=2)
    rows = rows[..., tr.num_prefix_tokens:]
    return rows.reshape(*rows.shape[:2], *tr.grid)


@torch.no_grad()
def attention(model, images: torch.Tensor) -> torch.Tensor:
    """Class-token attention over the patch grid: (B, layers, heads, gh, gw).

    Entry [b, l, h, i, j] is the softmax weight the class token's query gives to patch
    (i, j) in head h of block l (the class token's row, patch columns; the weights on the
    prefix tokens are left out, so a row sums to at most 1). For an encoder without a
    class token, the row is the mean over all query tokens instead.
    """
    enc = encoder(model)
    _check_attention_maps(enc, range(len(enc.blocks)))
    tr = trace(enc, images, with_code=False)
    return torch.stack([_query_rows(tr, b.attn) for b in tr.blocks], dim=1).cpu()


def _check_attention_maps(enc: nn.Module, indices) -> None:
    for i in indices:
        if not hasattr(_attention_view(enc.blocks[i].attn), "attention_map"):
            raise WhiteboxError(f"block {i}'s attention {type(enc.blocks[i].attn).__name__} gives no attention_map(x)")


def _upsample(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(..., gh, gw) bool -> (..., H, W) bool by nearest neighbour (each patch a block of pixels)."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest").reshape(*lead, *size).bool()


def _keep_mass(weights: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool mask of the smallest set of largest entries (last dim) holding ``keep`` of the mass."""
    w = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    val, idx = w.sort(dim=-1, descending=True)
    before = val.cumsum(dim=-1) - val       # mass of the larger entries
    chosen = before < keep                  # an entry joins while the kept mass is still short of ``keep``
    return torch.zeros_like(chosen).scatter(-1, idx, chosen)


@torch.no_grad()
def coarse_segmentation(model, images: torch.Tensor, keep: float = 0.6, layer: int = -1,
                        merge: str = "majority") -> torch.Tensor:
    """Foreground from class-token attention (DINO's rule): (B, H, W) bool.

    For each head of block ``layer``, the class token's attention over the patches is
    renormalised and the smallest set of patches holding ``keep`` of it is kept (DINO's
    60% mass threshold). Heads are merged by ``merge``: "majority" (default) keeps a
    patch that at least half of the heads keep — robust to a head that watches the
    background, which a union would paint in; "union" keeps a patch any head keeps.
    The patch mask is upsampled (nearest) to the image size. Without a class token the
    mean attention over all queries is used.
    """
    if not 0 < keep <= 1:
        raise WhiteboxError(f"keep must be in (0, 1], got {keep}")
    if merge not in ("majority", "union"):
        raise WhiteboxError(f"merge must be 'majority' or 'union', got {merge!r}")
    enc = encoder(model)
    index = _layer_index(layer, len(enc.blocks))
    _check_attention_maps(enc, [index])
    tr = trace(enc, images, layers=[index], with_code=False)
    rows = _query_rows(tr, tr.blocks[index].attn)                  # (B, heads, gh, gw)
    B, heads = rows.shape[:2]
    kept = _keep_mass(rows.reshape(B, heads, -1), keep).reshape(rows.shape)
    votes = kept.sum(dim=1)
    fg = votes * 2 >= heads if merge == "majority" else votes > 0
    return _upsample(fg, images.shape[-2:]).cpu()


# --------------------------------------------------------------------------------------
# PCA of the patch features
# --------------------------------------------------------------------------------------

def _border(grid: Tuple[int, int]) -> torch.Tensor:
    b = torch.ones(grid, dtype=torch.bool)
    b[1:-1, 1:-1] = False
    return b


@torch.no_grad()
def pca_features(model, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """First three principal components of the last block's patch tokens, as colours.

    Returns ``rgb`` (B, gh, gw, 3) in [0, 1] and ``foreground`` (B, gh, gw) bool. The PCA
    is fitted jointly over all patches of the batch (the output tokens of the last block,
    before the final norm; prefix tokens left out), so colours compare across images; each
    component is then min-max scaled over the batch.

    Foreground: patches whose first component is above its mean (0 after centering). An
    eigenvector's sign is arbitrary, so it is chosen by the rule of the CRATE papers'
    figures — the object is the side that does not fill the frame: the side holding the
    smaller share of the grid's border patches (over the batch) is the foreground, and on
    a tie the smaller side. Component 1 is signed so the foreground is bright; components
    2 and 3 so that their largest loading is positive, which makes the colours
    deterministic.
    """
    tr = trace(model, images, layers=[-1], with_attention=False, with_code=False)
    feats = tr.patches(tr.blocks[-1].out).double()          # (B, P, d)
    B, P, d = feats.shape
    flat = feats.reshape(B * P, d)
    centred = flat - flat.mean(dim=0, keepdim=True)
    # Eigenvectors of the d x d covariance: exact and deterministic (pca_lowrank is randomised).
    _, vecs = torch.linalg.eigh(centred.T @ centred)
    comps = vecs[:, -3:].flip(-1)                           # the three largest, largest first
    if comps.shape[1] < 3:
        comps = torch.cat([comps, comps.new_zeros(d, 3 - comps.shape[1])], dim=1)
    for j in (1, 2):
        if comps[comps[:, j].abs().argmax(), j] < 0:
            comps[:, j] = -comps[:, j]
    proj = (centred @ comps).reshape(B, *tr.grid, 3)
    pc1 = proj[..., 0]
    border = _border(tr.grid).to(pc1.device).expand(B, *tr.grid)
    pos = pc1 > 0
    share_pos = (pos & border).sum() / border.sum()
    share_neg = (~pos & border).sum() / border.sum()
    if share_neg < share_pos or (share_neg == share_pos and (~pos).sum() < pos.sum()):
        proj[..., 0] = -proj[..., 0]
    fg = proj[..., 0] > 0
    lo = proj.amin(dim=(0, 1, 2), keepdim=True)
    hi = proj.amax(dim=(0, 1, 2), keepdim=True)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return {"rgb": rgb.float().cpu(), "foreground": fg.cpu()}


# --------------------------------------------------------------------------------------
# MaskCut
# --------------------------------------------------------------------------------------

def _corners(mask: np.ndarray) -> int:
    return int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])


def ncut_bipartition(x, grid: Tuple[int, int], tau: Optional[float] = 0.15, *, affinity: bool = False,
                     exclude=None, eps: float = 1e-5) -> Tuple[np.ndarray, np.ndarray]:
    """One normalised cut of the patch graph, oriented and cleaned as in CutLER's MaskCut.

    Args:
        x: patch features (N, C) — rows are L2-normalised and compared by cosine — or, with
            ``affinity=True``, an (N, N) similarity matrix. N = gh * gw, row-major.
        grid: (gh, gw).
        tau: edges are 1 where the similarity exceeds ``tau`` and ``eps`` elsewhere (a
            graph that stays connected); ``None`` uses the similarities as weights.
        exclude: optional (gh, gw) bool of patches taken out of the graph (earlier masks);
            they are background in the result.

    Returns ``(mask, eigvec)``: the (gh, gw) bool foreground and the (gh, gw) second
    smallest generalised eigenvector of (D - A) v = λ D v, minus its mean and signed so
    that the foreground side is positive (0 at excluded patches).

    Orientation: the eigenvector is split at its mean; the side holding the patch of
    largest |v| (the seed) is the foreground (salient-patch rule); if that side holds at
    least 3 of the grid's 4 corners it is background instead and the other side is the
    foreground (corner rule, CutLER's count). CutLER applies the corner test to the
    ``v > mean`` side *before* the seed test, which lets its answer depend on the
    eigenvector's arbitrary sign when the seed lies on a side holding 3+ corners; here the
    corner test checks the chosen foreground, which agrees with CutLER wherever CutLER's
    answer does not depend on that sign. The seed is then re-chosen as the most extreme
    patch on the foreground side, and only the 4-connected component of the foreground
    containing it is kept.
    """
    from scipy import ndimage
    from scipy.linalg import eigh

    gh, gw = (int(g) for g in grid)
    n = gh * gw
    x = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if affinity:
        if x.shape != (n, n):
            raise WhiteboxError(f"affinity must be ({n}, {n}) for grid {gh}x{gw}, got {x.shape}")
        sim = x
    else:
        if x.ndim != 2 or x.shape[0] != n:
            raise WhiteboxError(f"features must be ({n}, C) for grid {gh}x{gw}, got {x.shape}")
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = unit @ unit.T
    out = np.zeros(n, dtype=bool), np.zeros(n)
    keep = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool).reshape(n)
    idx = np.flatnonzero(keep)
    if len(idx) < 3:  # no second eigenvector worth the name
        return out[0].reshape(gh, gw), out[1].reshape(gh, gw)
    sim = sim[np.ix_(idx, idx)]
    A = np.where(sim > tau, 1.0, eps) if tau is not None else sim.copy()
    A = (A + A.T) / 2  # floating-point round-off must not make the graph asymmetric
    deg = A.sum(axis=1)
    _, vecs = eigh(np.diag(deg) - A, np.diag(deg), subset_by_index=[1, 1])
    v = vecs[:, 0] - vecs[:, 0].mean()
    upper = v > 0
    if upper.all() or not upper.any():  # a constant eigenvector: nothing to cut
        return out[0].reshape(gh, gw), out[1].reshape(gh, gw)
    sign = 1.0 if upper[np.argmax(np.abs(v))] else -1.0     # salient-patch rule
    side = np.zeros(n, dtype=bool)
    side[idx] = sign * v > 0
    if _corners(side.reshape(gh, gw)) >= CORNER_FLIP:      # corner rule
        sign = -sign
    v = sign * v
    side[:] = False
    side[idx] = v > 0
    seed = idx[np.argmax(v)]
    labels, _ = ndimage.label(side.reshape(gh, gw))
    mask = labels == labels.reshape(n)[seed]
    vec = np.zeros(n)
    vec[idx] = v
    return mask, vec.reshape(gh, gw)


def maskcut_from_features(feats, grid: Tuple[int, int], num_masks: int = 3, tau: float = 0.15) -> torch.Tensor:
    """MaskCut on one image's patch features (N, C): (num_masks, gh, gw) bool.

    Each round cuts the graph of the patches not yet taken (:func:`ncut_bipartition`) and
    takes its foreground. CutLER keeps earlier foregrounds in the graph with zeroed
    features (edges of weight eps); here they are removed from the graph, which is the
    limit of that and keeps them from skewing the eigenvector. As in CutLER, a later mask
    of at most 1% of the grid ends the search: it and the rest are empty.
    """
    gh, gw = (int(g) for g in grid)
    if num_masks < 1:
        raise WhiteboxError(f"num_masks must be at least 1, got {num_masks}")
    taken = np.zeros((gh, gw), dtype=bool)
    masks = np.zeros((num_masks, gh, gw), dtype=bool)
    for i in range(num_masks):
        mask, _ = ncut_bipartition(feats, (gh, gw), tau, exclude=taken)
        if i > 0 and mask.sum() <= MIN_MASK_SHARE * gh * gw:
            break
        masks[i] = mask
        taken |= mask
    return torch.from_numpy(masks)


@torch.no_grad()
def maskcut(model, images: torch.Tensor, num_masks: int = 3, tau: float = 0.15) -> torch.Tensor:
    """MaskCut (CutLER) on the last block's subspace features: (B, num_masks, H, W) bool.

    Features: the last block's MSSA projections U^T z of its attention input (all heads
    concatenated; the keys for a ViT) at the patch tokens. Masks are cut on the patch
    grid (:func:`maskcut_from_features`) and upsampled (nearest) to the image size.
    """
    tr = trace(model, images, layers=[-1], with_attention=False, with_code=False)
    w = tr.blocks[-1].features                              # (B, heads, N, p)
    feats = tr.patches(w.transpose(1, 2).flatten(2))        # (B, P, heads * p)
    masks = torch.stack([maskcut_from_features(f, tr.grid, num_masks, tau) for f in feats])
    return _upsample(masks, images.shape[-2:])


# --------------------------------------------------------------------------------------
# Per-layer diagnostics
# --------------------------------------------------------------------------------------

@torch.no_grad()
def coding_rate(features: torch.Tensor, eps: float = CODING_RATE_EPS) -> torch.Tensor:
    """Σ_k R(W_k) per image from per-head features (B, heads, N, p): (B,) float64.

    W_k (N x p) is head k's projection of the N tokens with each row L2-normalised, and
    R(W_k) = ½ logdet(I_N + p / (N ε) W_k W_k^T), computed through the equal p x p form
    ½ logdet(I_p + p / (N ε) W_k^T W_k) in float64 (the convention of the CRATE release's
    coding-rate measurement).
    """
    w = F.normalize(features.double(), dim=-1)
    B, heads, N, p = w.shape
    gram = w.transpose(-2, -1) @ w                          # (B, heads, p, p)
    eye = torch.eye(p, dtype=w.dtype, device=w.device)
    return 0.5 * torch.linalg.slogdet(eye + (p / (N * eps)) * gram).logabsdet.sum(dim=1)


@torch.no_grad()
def code_sparsity(code: torch.Tensor) -> torch.Tensor:
    """Share of exact zeros per image in a (B, N, K) code: (B,)."""
    return (code == 0).flatten(1).double().mean(dim=1)


@torch.no_grad()
def dictionary_error(mlp: nn.Module, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """‖D code − x‖_F / ‖x‖_F per image: (B,), D the dictionary of the sparse-coding step ``mlp``.

    The operator's own ``reconstruct(z)``: ODL decodes with its sparse-coding dictionary
    D (``F.linear(z2, D)``; not D1, which maps the code back into the residual stream),
    ISTA with its W (``F.linear(z, W)``).
    """
    if not hasattr(mlp, "reconstruct"):
        raise WhiteboxError(f"{type(mlp).__name__} has no dictionary (no reconstruct(z))")
    err = mlp.reconstruct(code.to(_dtype_of(mlp, code.dtype))).double() - x.double()
    return err.flatten(1).norm(dim=1) / x.double().flatten(1).norm(dim=1).clamp_min(1e-30)


@torch.no_grad()
def layer_diagnostics(model, images: torch.Tensor) -> List[dict]:
    """Per block: ``layer`` (1-based), ``coding_rate``, ``sparsity``, ``recon_error``, averaged over images.

    * coding_rate — :func:`coding_rate` of the tokens entering the block's attention
      (after norm1, class token included) projected on each head's subspace (the
      attention's ``subspace_features``; the keys for a ViT). Lower is more compressed.
    * sparsity — share of exact zeros in the sparse code (``sparse_code``): ODL's z2
      (after the second ReLU), ISTA's output z; for a ViT the MLP's hidden activations
      (GELU: usually ~0); None for an MLP that gives no code.
    * recon_error — :func:`dictionary_error` of that code against the block's MLP input
      (after norm2); None for an operator without ``reconstruct`` (a ViT's MLP).
    """
    enc = encoder(model)
    tr = trace(enc, images, with_attention=False)
    rows = []
    for i, (blk, rec) in enumerate(zip(enc.blocks, tr.blocks)):
        rate = coding_rate(rec.features).mean().item()
        sparsity = None if rec.code is None else code_sparsity(rec.code).mean().item()
        recon = None
        if rec.code is not None and hasattr(blk.mlp, "reconstruct"):
            x = rec.mlp_in.to(_dtype_of(blk.mlp, rec.mlp_in.dtype))
            recon = dictionary_error(blk.mlp, x, rec.code).mean().item()
        rows.append({"layer": i + 1, "coding_rate": rate, "sparsity": sparsity, "recon_error": recon})
    return rows
