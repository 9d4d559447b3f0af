"""CRATE-α: the white-box vision transformer of "Scaling White-Box Transformers for Vision".

Each layer is MSSA (multi-head subspace self-attention: one shared projection per head is
query, key and value) followed by ODL (overcomplete dictionary learning: two ISTA steps on
a d x 4d dictionary D, decoded by a separate dictionary D1), both pre-norm and residual.

The encoder is timm's VisionTransformer with the two CRATE-α operators plugged in as its
``attn_layer`` and ``mlp_layer``, so patch embedding, class token, pooling, drop-path,
layer scale, gradient checkpointing, ``forward_intermediates``, ``group_matcher`` and
``set_input_size`` are timm's own. What CRATE-α adds on top:

* the operators (``MSSA``, ``ODL``) and the paper's initialisation;
* the official classifier's head LayerNorm eps (1e-5, while blocks use 1e-6);
* a fixed 2-D sin-cos position embedding option (the paper's JAX code);
* position grids resampled on *any* ``load_state_dict`` (timm, open_clip, plain torch),
  so a checkpoint trained at 84 px loads into a 224 px model and back.

Reads top-down: operators, model, configs, registrations.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["MSSA", "ODL", "CrateAlpha", "CRATE_ALPHA_SIZES", "list_crate_alpha_models"]


# --------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------

class MSSA(nn.Module):
    """Multi-head subspace self-attention.

    One bias-free projection U per head serves as query, key and value:
    ``softmax((xU)(xU)^T / sqrt(d_head)) (xU)``, heads concatenated, then a bias-free
    output projection. The signature follows timm's ``Attention`` so timm's ``Block``
    can build it.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[type] = None,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSSA: width {dim} is not divisible by {num_heads} heads")
        if qk_norm or scale_norm:
            raise ValueError("MSSA has one shared q=k=v projection; qk_norm/scale_norm do not apply")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim, bias=qkv_bias, **dd)  # the subspace bases U, shared by q, k, v
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self) -> None:
        # The paper's code draws the projections from normal(0.02), not timm's truncated normal.
        for lin in (self.qkv, self.proj):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        w = self.qkv(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(
            w, w, w,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ODL(nn.Module):
    """Overcomplete dictionary learning: two ISTA steps, then decoding.

    With D, D1 of shape (d, r*d) and eta = lambda = 0.1::

        z1 = relu(eta * x D - eta * lambda)
        z2 = relu(z1 - eta * (z1 D^T - x) D - eta * lambda)
        out = z2 D1^T

    The signature follows timm's ``Mlp`` (``hidden_features`` is the dictionary size) so
    timm's ``Block`` can build it; ``act_layer`` and ``bias`` are accepted and unused.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Optional[type] = None,
            norm_layer: Optional[type] = None,
            bias: bool = False,
            drop: float = 0.,
            eta: float = 0.1,
            lmbda: float = 0.1,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        super().__init__()
        if out_features not in (None, in_features):
            raise ValueError("ODL maps the residual stream to itself: out_features must equal in_features")
        hidden_features = hidden_features or 4 * in_features
        dd = {"device": device, "dtype": dtype}
        self.eta = eta
        self.lmbda = lmbda
        self.D = nn.Parameter(torch.empty(in_features, hidden_features, **dd))
        self.D1 = nn.Parameter(torch.empty(in_features, hidden_features, **dd))
        self.drop = nn.Dropout(drop)
        self.init_weights()

    def init_weights(self) -> None:
        # kaiming-uniform on the (d, r*d) tensors, as the official code does.
        nn.init.kaiming_uniform_(self.D)
        nn.init.kaiming_uniform_(self.D1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eta, shrink = self.eta, self.eta * self.lmbda
        Dt = self.D.t()
        z1 = F.relu(eta * F.linear(x, Dt) - shrink)
        residual = F.linear(z1, self.D) - x
        z2 = F.relu(z1 - eta * F.linear(residual, Dt) - shrink)
        return self.drop(F.linear(z2, self.D1))

    def extra_repr(self) -> str:
        return f"dict={tuple(self.D.shape)}, eta={self.eta}, lmbda={self.lmbda}"


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

def sincos_2d_pos_embed(grid: Tuple[int, int], dim: int, temperature: float = 10000.) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding in big_vision's layout: [sin x, cos x, sin y, cos y].

    Written here because timm's builder orders the four blocks differently, and the
    paper's JAX checkpoints expect big_vision's order.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                          indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float32) / max(dim // 4 - 1, 1)
    omega = 1. / temperature ** omega
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _grid_of(num_tokens: int, what: str) -> Tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{what}: {num_tokens} position tokens do not form a square grid")
    return side, side


def _patch_embed_with_bias(patch_bias: bool):
    # timm decides the patch-embedding bias from ``pre_norm``; CRATE-α decouples the two.
    def make(*args, bias: bool = True, **kwargs):
        return PatchEmbed(*args, bias=patch_bias, **kwargs)
    return make


class CrateAlpha(VisionTransformer):
    """CRATE-α encoder (and classifier) on timm's VisionTransformer.

    Args beyond timm's VisionTransformer:
        pos_embed: 'learn' (learned, the released models) or 'sincos' (fixed 2-D sin-cos).
        patch_bias: bias in the patch-embedding convolution.
        head_norm_eps: eps of the final LayerNorm (the official classifier uses 1e-5).
        norm_eps: eps of the block LayerNorms.
        eta, lmbda: ISTA step size and sparsity weight of ODL.
        overcomplete_ratio: dictionary size over width (4 in the paper).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            pos_embed: str = "learn",
            patch_bias: bool = True,
            norm_eps: float = 1e-6,
            head_norm_eps: float = 1e-6,
            eta: float = 0.1,
            lmbda: float = 0.1,
            overcomplete_ratio: float = 4.,
            **kwargs: Any,
    ) -> None:
        if pos_embed not in ("learn", "sincos", "none", ""):
            raise ValueError(f"pos_embed must be 'learn', 'sincos' or 'none', got {pos_embed!r}")
        for key in ("attn_layer", "mlp_layer", "block_fn", "embed_layer", "mlp_ratio"):
            if key in kwargs:
                raise ValueError(f"CrateAlpha fixes {key}; it cannot be overridden")
        self.pos_embed_type = pos_embed
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=norm_eps))
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("proj_bias", False)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=overcomplete_ratio,
            pos_embed="learn" if pos_embed == "sincos" else pos_embed,
            embed_layer=_patch_embed_with_bias(patch_bias),
            attn_layer=MSSA,
            mlp_layer=partial(ODL, eta=eta, lmbda=lmbda),
            **kwargs,
        )
        if head_norm_eps != norm_eps:
            if not isinstance(self.norm, nn.Identity):
                self.norm = nn.LayerNorm(embed_dim, eps=head_norm_eps)
            if not isinstance(self.fc_norm, nn.Identity):
                self.fc_norm = nn.LayerNorm(embed_dim, eps=head_norm_eps)
        if pos_embed == "sincos":
            self.pos_embed.requires_grad_(False)
            self.reset_pos_embed_sincos()

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        if getattr(self, "pos_embed_type", "learn") == "sincos":
            self.reset_pos_embed_sincos()

    @torch.no_grad()
    def reset_pos_embed_sincos(self) -> None:
        """Set the position embedding to 2-D sin-cos at the current grid (class slot zero).

        The official CLIPA fine-tuning does this at the new resolution instead of
        resampling the learned low-resolution embedding.
        """
        if self.pos_embed is None:
            raise ValueError("this model has no position embedding")
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pe = sincos_2d_pos_embed(self.patch_embed.grid_size, self.embed_dim)
        pe = torch.cat([pe.new_zeros(prefix, self.embed_dim), pe], dim=0)[None]
        if pe.shape != self.pos_embed.shape:
            self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)
        self.pos_embed.copy_(pe.to(self.pos_embed))

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if img_size is not None:
            img_size = to_2tuple(img_size)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed_type == "sincos":
            self.reset_pos_embed_sincos()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Resample a position grid of another resolution here, so that every loader
        # (timm, open_clip, plain torch) gets it, not only timm's pretrained path.
        key = prefix + "pos_embed"
        if self.pos_embed is not None and key in state_dict:
            src = state_dict[key]
            if (src.ndim == 3 and src.shape[-1] == self.pos_embed.shape[-1]
                    and src.shape[1] != self.pos_embed.shape[1]):
                n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
                old_grid = _grid_of(src.shape[1] - n_prefix, f"checkpoint {key}")
                state_dict[key] = resample_abs_pos_embed(
                    src,
                    new_size=self.patch_embed.grid_size,
                    old_size=old_grid,
                    num_prefix_tokens=n_prefix,
                    interpolation="bilinear",
                    antialias=False,
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

# width, depth, heads (the paper's Table 1); 'demo' is this project's one-laptop size.
CRATE_ALPHA_SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (576, 12, 12),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "demo": (128, 4, 4),
}

# (size, patch, resolution) of every registered name.
_VARIANTS = [
    ("tiny", 16, 224),
    ("small", 16, 224),
    ("base", 32, 224),
    ("base", 16, 224),
    ("base", 8, 224),
    ("large", 32, 224),
    ("large", 14, 224),
    ("large", 8, 224),
    ("huge", 14, 224),
    ("demo", 8, 64),
]

# Custom sizes (e.g. from converted checkpoints) are named by their shape.
_CUSTOM_NAME = re.compile(r"^crate_alpha_w(\d+)_d(\d+)_h(\d+)_patch(\d+)_(\d+)$")


def _cfg(res: int = 224, **kwargs: Any) -> Dict[str, Any]:
    # The official evaluation: resize 256, centre crop 224 (bilinear), ImageNet mean/std.
    return {
        "num_classes": 1000,
        "input_size": (3, res, res),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2405.20299",
        **kwargs,
    }


def variant_name(size: str, patch: int, res: int) -> str:
    return f"crate_alpha_{size}_patch{patch}_{res}"


def custom_variant_name(width: int, depth: int, heads: int, patch: int, res: int) -> str:
    return f"crate_alpha_w{width}_d{depth}_h{heads}_patch{patch}_{res}"


def check_shape_args(embed_dim, depth, num_heads, patch_size, img_size, what: str = "CRATE-α model") -> None:
    """Refuse a shape that would build an empty model or divide by zero, naming the problem."""
    problems = []
    for key, value in (("width", embed_dim), ("depth", depth), ("heads", num_heads)):
        if value < 1:
            problems.append(f"{key} {value} must be at least 1")
    # timm accepts img_size=None (dynamic input size); then only the patch can be checked.
    patch = to_2tuple(patch_size)
    res = to_2tuple(img_size) if img_size is not None else None
    if min(patch) < 1:
        problems.append(f"patch size {patch_size} must be at least 1")
    if res is not None and min(res) < 1:
        problems.append(f"resolution {img_size} must be at least 1")
    if not problems and res is not None and (patch[0] > res[0] or patch[1] > res[1]):
        problems.append(f"patch size {patch_size} is larger than the resolution {img_size}")
    if embed_dim >= 1 and num_heads >= 1 and embed_dim % num_heads:
        problems.append(f"width {embed_dim} is not divisible by {num_heads} heads")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def variant_args(name: str) -> Dict[str, Any]:
    """Architecture arguments of a registered or shape-named CRATE-α variant."""
    m = _CUSTOM_NAME.match(name)
    if m:
        w, d, h, p, r = map(int, m.groups())
        check_shape_args(w, d, h, p, r, what=name)
        return dict(embed_dim=w, depth=d, num_heads=h, patch_size=p, img_size=r)
    for size, patch, res in _VARIANTS:
        if variant_name(size, patch, res) == name:
            w, d, h = CRATE_ALPHA_SIZES[size]
            return dict(embed_dim=w, depth=d, num_heads=h, patch_size=patch, img_size=res)
    raise ValueError(unknown_model_message(name))


def list_crate_alpha_models() -> list:
    return [variant_name(*v) for v in _VARIANTS]


def unknown_model_message(name: str) -> str:
    return (f"unknown CRATE-α model {name!r}; known names: {', '.join(list_crate_alpha_models())} "
            "(or crate_alpha_w{{width}}_d{{depth}}_h{{heads}}_patch{{P}}_{{res}} for another shape)")


default_cfgs = generate_default_cfgs({
    variant_name(size, patch, res): _cfg(res) for size, patch, res in _VARIANTS
})


def _create_crate_alpha(variant: str, pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    args = variant_args(variant)
    args.update(kwargs)
    # Size arguments may override the name's, so the merged shape is checked again.
    check_shape_args(args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"], args["img_size"],
                     what=variant)
    if _CUSTOM_NAME.match(variant):
        if args.get("pretrained_cfg") is None:
            args["pretrained_cfg"] = _cfg(to_2tuple(args["img_size"])[0])
    # features_only=True goes through timm's feature getter (forward_intermediates), as for ViTs
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(CrateAlpha, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


# --------------------------------------------------------------------------------------
# Registrations
# --------------------------------------------------------------------------------------

@register_model
def crate_alpha_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_tiny_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_small_patch16_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_small_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch32_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base_patch32_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch16_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base_patch16_224", pretrained, **kwargs)


@register_model
def crate_alpha_base_patch8_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_base_patch8_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch32_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large_patch32_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch14_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large_patch14_224", pretrained, **kwargs)


@register_model
def crate_alpha_large_patch8_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_large_patch8_224", pretrained, **kwargs)


@register_model
def crate_alpha_huge_patch14_224(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_huge_patch14_224", pretrained, **kwargs)


@register_model
def crate_alpha_demo_patch8_64(pretrained: bool = False, **kwargs) -> CrateAlpha:
    return _create_crate_alpha("crate_alpha_demo_patch8_64", pretrained, **kwargs)


def _install_shape_named_variants() -> None:
    """Let timm resolve shape-named variants (crate_alpha_w64_d2_h4_patch8_32, ...).

    timm's registry is a fixed name -> function table, and open_clip builds its timm
    tower from a name alone (no size arguments). Converted checkpoints of any shape must
    load through open_clip, so the table is given a fallback for this one name pattern.
    """
    from timm.models import _registry

    table = _registry._model_entrypoints
    if getattr(table, "_crate_alpha", False):
        return

    class _Entrypoints(dict):
        _crate_alpha = True

        def __contains__(self, name):
            return dict.__contains__(self, name) or bool(_CUSTOM_NAME.match(str(name)))

        def __missing__(self, name):
            if _CUSTOM_NAME.match(str(name)):
                return partial(_create_crate_alpha, name)
            raise KeyError(name)

    _registry._model_entrypoints = _Entrypoints(table)


_install_shape_named_variants()
