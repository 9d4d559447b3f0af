"""CRATE: the original white-box transformer of "White-Box Transformers via Sparse Rate
Reduction" (Yu et al., NeurIPS 2023), on the same timm VisionTransformer as CRATE-α.

Each layer compresses the tokens with MSSA (multi-head subspace self-attention, residual)
and then sparsifies them with one ISTA step on a square dictionary D (no residual)::

    z = x + MSSA(LN(x))
    x' = ISTA(LN(z)) = ReLU(u + eta * D^T (u - D u) - eta * lambda),   u = LN(z)

with eta = lambda = 0.1. The patch embedding is the original's: LayerNorm over each
flattened patch (pixel order p1, p2, channel), linear projection with bias, LayerNorm.
Then class token, learned position embedding (class slot included), the blocks, a final
LayerNorm and a linear head on the class token. All LayerNorms use eps 1e-5 (PyTorch's
default, as the original), the output projection of MSSA has a bias, the attention
projection has none, and the default initialisation (``weight_init='crate'``) is the
original's: PyTorch defaults for linear and norm layers, kaiming-uniform for D, standard
normal class token and position embedding. (The original drops the output projection
when a model has one head; this class always keeps it.)

Ablation ladder CRATE -> CRATE-α, as constructor arguments of :class:`Crate` (cumulative;
``ABLATION_LADDER`` holds them by name):

1. ``crate``: ``Crate()`` -- the original model above.
2. width scaling: sizes are ``embed_dim``/``depth``/``num_heads``; CRATE-α's table
   (``CRATE_ALPHA_SIZES``) narrows tiny to 192 wide, 3 heads (CRATE-T is 384, 6 heads) and
   keeps small/base/large as in CRATE (``CRATE_SIZES``).
3. ``odl``: ``mlp='odl'`` -- the sparse-coding block becomes CRATE-α's ODL: an
   overcomplete dictionary D of size d x ``overcomplete_ratio`` * d (4d), two ISTA steps
   from zero, decoded by a separate dictionary D1.
4. ``residual``: ``mlp_residual=True`` -- a residual connection around that block.
5. ``crate_alpha``: the remaining implementation details of this project's
   :class:`~crate_alpha.CrateAlpha` -- ``patch_embed='conv'`` (timm's convolutional patch
   embedding with bias, no patch LayerNorms), ``proj_bias=False``, ``norm_eps=1e-6`` and
   ``weight_init=''`` (timm's initialisation; MSSA draws from normal(0.02)). At this step
   the state dict and the outputs are CrateAlpha's exactly.

Registered timm names: ``crate_{tiny,small,base,large}_patch16_224`` (the sizes of the
official ``CRATE_tiny/small/base/large``) and ``crate_demo_patch8_64`` (the laptop demo's
size). No weights are downloaded; an original CRATE checkpoint (``model.state_dict()`` of
the official code, with or without DDP's ``module.`` prefix) loads through timm with
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``, renamed by
:func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .crate_alpha import build_variant, pretrained_cfg
from .layers import ISTA, MSSA, ODL, resample_pos_embed_on_load
from ..errors import ModelConfigError

__all__ = ["ISTA", "CrateBlock", "CratePatchEmbed", "Crate", "CRATE_SIZES", "ABLATION_LADDER",
           "checkpoint_filter_fn", "list_crate_models"]


# --------------------------------------------------------------------------------------
# Blocks (the operators, ISTA among them, are in models/layers.py)
# --------------------------------------------------------------------------------------

class CrateBlock(Block):
    """timm's pre-norm ``Block`` with an optional residual around the MLP (sparse-coding) step.

    ``mlp_residual=False`` (CRATE): ``x = x + drop_path1(ls1(attn(norm1(x))))``, then
    ``x = mlp(norm2(x))``. Layer scale and drop path only apply to residual branches, so
    ``ls2`` and ``drop_path2`` are identities there. ``mlp_residual=True`` is timm's Block.
    """

    def __init__(self, *args: Any, mlp_residual: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mlp_residual = mlp_residual
        if not mlp_residual:
            self.ls2 = nn.Identity()
            self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if self.mlp_residual:
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.mlp(self.norm2(x))


class CratePatchEmbed(PatchEmbed):
    """The original CRATE patch embedding: LayerNorm(patch) -> Linear -> LayerNorm.

    Patches are flattened in (row, column, channel) order, as the original's
    ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``. Image size, dynamic size and padding
    behave as in timm's ``PatchEmbed``; the patch size is fixed (the patch LayerNorm has a
    weight per pixel, which has no resampling).
    """

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            norm_layer: Optional[type] = None,
            bias: bool = True,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=1,
                         bias=False, **kwargs)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        dd = {"device": device, "dtype": dtype}
        patch_dim = in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm_in = norm_layer(patch_dim, **dd)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise ModelConfigError("CRATE's patch embedding has a LayerNorm over each patch's pixels; "
                             "its patch size cannot be changed")
        super().set_input_size(img_size=img_size, patch_size=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ModelConfigError(f"input size ({H}, {W}) does not match the model's {tuple(self.img_size)}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        elif H % ph or W % pw:
            raise ModelConfigError(f"input size ({H}, {W}) is not divisible by the patch size {self.patch_size}")
        B, C, H, W = x.shape
        gh, gw = H // ph, W // pw
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, gh, gw, ph * pw * C)
        x = self.norm(self.proj(self.norm_in(x)))
        if self.output_fmt == Format.NHWC:
            return x
        if self.output_fmt == Format.NCHW and not self.flatten:
            return x.permute(0, 3, 1, 2)
        if self.output_fmt not in (Format.NCHW, Format.NLC):
            raise ModelConfigError(f"CratePatchEmbed: unsupported output format {self.output_fmt}")
        return x.reshape(B, gh * gw, -1)


def _conv_patch_embed(patch_bias: bool):
    # timm's PatchEmbed, with its bias decided here rather than by ``pre_norm``.
    def make(*args, bias: bool = True, **kwargs):
        return PatchEmbed(*args, bias=patch_bias, **kwargs)
    return make


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

class Crate(VisionTransformer):
    """CRATE encoder and classifier on timm's VisionTransformer.

    Args beyond timm's VisionTransformer (defaults: the original CRATE):
        mlp: 'ista' (CRATE: one ISTA step, square dictionary) or 'odl' (CRATE-α's ODL).
        mlp_residual: residual connection around the sparse-coding block (CRATE-α).
        overcomplete_ratio: ODL's dictionary size over width (ignored by 'ista').
        eta, lmbda: ISTA step size and sparsity weight.
        patch_embed: 'crate' (LayerNorm -> Linear -> LayerNorm, the original) or 'conv'
            (timm's convolutional patch embedding, as CRATE-α).
        patch_bias: bias of the patch projection.
        norm_eps: eps of every LayerNorm (1e-5 in the original).
        weight_init: 'crate' (the original's initialisation) or one of timm's modes.
    See the module docstring for the CRATE -> CRATE-α ladder.
    """

    def __init__(
            self,
            mlp: str = "ista",
            mlp_residual: bool = False,
            overcomplete_ratio: float = 4.,
            eta: float = 0.1,
            lmbda: float = 0.1,
            patch_embed: str = "crate",
            patch_bias: bool = True,
            norm_eps: float = 1e-5,
            weight_init: str = "crate",
            **kwargs: Any,
    ) -> None:
        if mlp not in ("ista", "odl"):
            raise ModelConfigError(f"mlp must be 'ista' (CRATE) or 'odl' (CRATE-α), got {mlp!r}")
        if patch_embed not in ("crate", "conv"):
            raise ModelConfigError(f"patch_embed must be 'crate' or 'conv', got {patch_embed!r}")
        for key in ("attn_layer", "mlp_layer", "block_fn", "embed_layer", "mlp_ratio"):
            if key in kwargs:
                raise ModelConfigError(f"Crate fixes {key}; choose the blocks with mlp=, mlp_residual=, patch_embed=")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        kwargs.setdefault("norm_layer", norm_layer)
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("proj_bias", True)
        if patch_embed == "crate":
            embed_layer = partial(CratePatchEmbed, norm_layer=norm_layer, bias=patch_bias)
        else:
            embed_layer = _conv_patch_embed(patch_bias)
        if mlp == "ista":
            mlp_layer, mlp_ratio = partial(ISTA, eta=eta, lmbda=lmbda), 1.
        else:
            mlp_layer, mlp_ratio = partial(ODL, eta=eta, lmbda=lmbda), overcomplete_ratio
        self.mlp_kind = mlp
        super().__init__(  # img_size, patch_size, embed_dim, depth, num_heads: timm's, through kwargs
            mlp_ratio=mlp_ratio,
            embed_layer=embed_layer,
            block_fn=partial(CrateBlock, mlp_residual=mlp_residual),
            attn_layer=MSSA,
            mlp_layer=mlp_layer,
            weight_init=weight_init,
            **kwargs,
        )

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        mode = mode or self.weight_init_mode
        if mode != "crate":
            super().init_weights(mode, needs_reset=needs_reset)
            return
        # The original: torch.randn class token and position embedding, PyTorch's default
        # linear and LayerNorm init, kaiming-uniform dictionaries.
        with torch.no_grad():
            for p in (self.pos_embed, self.cls_token, self.reg_token):
                if p is not None:
                    nn.init.normal_(p)
            for m in self.modules():
                if isinstance(m, ODL):
                    m.init_weights()
                elif m is not self and hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    def fix_init_weight(self) -> None:
        raise ModelConfigError("fix_init rescales an MLP's fc2, which CRATE's blocks do not have")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A position grid of another resolution is resampled on any load, as CrateAlpha's.
        resample_pos_embed_on_load(self, state_dict, prefix + "pos_embed")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------------------
# Configs, checkpoint conversion, registrations
# --------------------------------------------------------------------------------------

# width, depth, heads of the official CRATE_tiny/small/base/large; 'demo' is the laptop size.
CRATE_SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (384, 12, 6),
    "small": (576, 12, 12),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "demo": (128, 4, 4),
}

_VARIANTS = [("tiny", 16, 224), ("small", 16, 224), ("base", 16, 224), ("large", 16, 224), ("demo", 8, 64)]

# Cumulative constructor arguments of each step from CRATE to CRATE-α (module docstring).
ABLATION_LADDER: Dict[str, Dict[str, Any]] = {
    "crate": {},
    "odl": dict(mlp="odl"),
    "residual": dict(mlp="odl", mlp_residual=True),
    "crate_alpha": dict(mlp="odl", mlp_residual=True, patch_embed="conv", proj_bias=False, norm_eps=1e-6,
                        weight_init=""),
}


def crate_variant_name(size: str, patch: int, res: int) -> str:
    return f"crate_{size}_patch{patch}_{res}"


def list_crate_models() -> list:
    return [crate_variant_name(*v) for v in _VARIANTS]


def _cfg(res: int = 224, **kwargs: Any) -> Dict[str, Any]:
    # CRATE-α's (the same official evaluation and layout), with CRATE's paper
    return pretrained_cfg(res, **{"paper_ids": "arXiv:2306.01129",
                                  "paper_name": "White-Box Transformers via Sparse Rate Reduction",
                                  "origin_url": "https://github.com/Ma-Lab-Berkeley/CRATE", **kwargs})


default_cfgs = generate_default_cfgs({crate_variant_name(*v): _cfg(v[2]) for v in _VARIANTS})

# Official module names -> timm names ({i} is the layer index).
_RENAMES = [
    (r"^to_patch_embedding\.1\.", "patch_embed.norm_in."),
    (r"^to_patch_embedding\.2\.", "patch_embed.proj."),
    (r"^to_patch_embedding\.3\.", "patch_embed.norm."),
    (r"^pos_embedding$", "pos_embed"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.layers\.(\d+)\.1\.norm\.", r"blocks.\1.norm2."),
    (r"^transformer\.layers\.(\d+)\.1\.fn\.weight$", r"blocks.\1.mlp.weight"),
    (r"^mlp_head\.0\.", "norm."),
    (r"^mlp_head\.1\.", "head."),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Rename an official CRATE state dict to this model's names (timm ones pass through).

    Also strips DDP's ``module.`` prefix. A position grid of another resolution is
    resampled when the result is loaded (``Crate._load_from_state_dict``).
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _RENAMES:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out


def _create_crate(variant: str, pretrained: bool = False, **kwargs: Any) -> Crate:
    size, patch, res = next(v for v in _VARIANTS if crate_variant_name(*v) == variant)
    width, depth, heads = CRATE_SIZES[size]
    args = dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, img_size=res)
    return build_variant(Crate, variant, pretrained, {**args, **kwargs}, pretrained_filter_fn=checkpoint_filter_fn)


@register_model
def crate_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Crate:
    return _create_crate("crate_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_small_patch16_224(pretrained: bool = False, **kwargs) -> Crate:
    return _create_crate("crate_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_base_patch16_224(pretrained: bool = False, **kwargs) -> Crate:
    return _create_crate("crate_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_large_patch16_224(pretrained: bool = False, **kwargs) -> Crate:
    return _create_crate("crate_large_patch16_224", pretrained, **kwargs)


@register_model
def crate_demo_patch8_64(pretrained: bool = False, **kwargs) -> Crate:
    return _create_crate("crate_demo_patch8_64", pretrained, **kwargs)
