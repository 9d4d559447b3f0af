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

The operators live in :mod:`crate_alpha.models.layers` (re-exported here). Reads
top-down: model, configs, released weights, registrations. The fixed
names (``list_crate_alpha_models()``) carry the released weights as timm pretrained tags
(``crate_alpha_base_patch16_224.in21k_ft_in1k``), converted from the official layouts on
load. Any other shape is ``crate_alpha_custom``: its shape comes from ``model_args``
(timm's ``config.json``) or from the tag ``crate_alpha_custom.w{W}_d{D}_h{H}_patch{P}_{R}``
(open_clip's timm towers, which can pass timm a name but no arguments), so no name ever
needs registering at run time.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from . import released
from .layers import MSSA, ODL, SparseCodingLayer, resample_pos_embed_on_load, sincos_2d_pos_embed
from .official_layout import (
    big_vision_classifier_state,
    classifier_state,
    clipa_trunk_state,
    load_npz,
    official_layout,
)
from ..errors import CheckpointError, ModelConfigError

__all__ = ["MSSA", "ODL", "SparseCodingLayer", "sincos_2d_pos_embed", "CrateAlpha", "CRATE_ALPHA_SIZES",
           "list_crate_alpha_models", "checkpoint_filter_fn"]


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

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
            raise ModelConfigError(f"pos_embed must be 'learn', 'sincos' or 'none', got {pos_embed!r}")
        for key in ("attn_layer", "mlp_layer", "block_fn", "embed_layer", "mlp_ratio"):
            if key in kwargs:
                raise ModelConfigError(f"CrateAlpha fixes {key}; it cannot be overridden")
        self.pos_embed_type = pos_embed
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=norm_eps))
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("proj_bias", False)
        super().__init__(  # img_size, patch_size, embed_dim, depth, num_heads: timm's, through kwargs
            mlp_ratio=overcomplete_ratio,
            pos_embed="learn" if pos_embed == "sincos" else pos_embed,
            embed_layer=_patch_embed_with_bias(patch_bias),
            attn_layer=MSSA,
            mlp_layer=partial(ODL, eta=eta, lmbda=lmbda),
            **kwargs,
        )
        if head_norm_eps != norm_eps:
            if not isinstance(self.norm, nn.Identity):
                self.norm = nn.LayerNorm(self.embed_dim, eps=head_norm_eps)
            if not isinstance(self.fc_norm, nn.Identity):
                self.fc_norm = nn.LayerNorm(self.embed_dim, eps=head_norm_eps)
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
            raise ModelConfigError("this model has no position embedding")
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

    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """A released big_vision ``.npz`` (timm's ``custom_load`` hook), converted on load."""
        info, state = big_vision_classifier_state(load_npz(checkpoint_path), prefix)
        _check_released_shape(self, info, checkpoint_path)
        if self.num_classes != info["n_out"]:  # another head was asked for: keep the trunk only
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        self.load_state_dict(state, strict=self.num_classes == info["n_out"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Resample a position grid of another resolution here, so that every loader
        # (timm, open_clip, plain torch) gets it, not only timm's pretrained path.
        resample_pos_embed_on_load(self, state_dict, prefix + "pos_embed")
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

# Any other size (a converted checkpoint, an exported run at another resolution) is
# crate_alpha_custom, its shape in model_args or spelled by its tag.
CUSTOM = "crate_alpha_custom"
_SHAPE_TAG = re.compile(r"^w(\d+)_d(\d+)_h(\d+)_patch(\d+)_(\d+)$")


def pretrained_cfg(res: int = 224, **kwargs: Any) -> Dict[str, Any]:
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
        "license": released.LICENSE,
        "paper_ids": "arXiv:2405.20299",
        "paper_name": "Scaling White-Box Transformers for Vision",
        "origin_url": "https://github.com/UCSC-VLAA/CRATE-alpha",
        **kwargs,
    }


def variant_name(size: str, patch: int, res: int) -> str:
    return f"crate_alpha_{size}_patch{patch}_{res}"


def custom_variant_name(width: int, depth: int, heads: int, patch: int, res: int) -> str:
    """``crate_alpha_custom.w{W}_d{D}_h{H}_patch{P}_{R}``: a shape as a name timm resolves with no registration."""
    return f"{CUSTOM}.w{width}_d{depth}_h{heads}_patch{patch}_{res}"


def _shape_of_tag(tag: str, what: str) -> Dict[str, Any]:
    m = _SHAPE_TAG.match(tag)
    if m is None:
        raise ModelConfigError(f"{what}: the tag {tag!r} is not a shape w{{width}}_d{{depth}}_h{{heads}}_patch{{P}}_{{res}} "
                         "(crate_alpha_custom has no released weights)")
    w, d, h, p, r = map(int, m.groups())
    check_shape_args(w, d, h, p, r, what=what)
    return dict(embed_dim=w, depth=d, num_heads=h, patch_size=p, img_size=r)


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
        raise ModelConfigError(f"{what}: " + "; ".join(problems))


def variant_args(name: str) -> Dict[str, Any]:
    """Architecture arguments of a CRATE-α name: a fixed one, ``crate_alpha_custom`` (the
    base shape, to be overridden) or ``crate_alpha_custom.<shape tag>``; a pretrained tag
    of a fixed name does not change its shape."""
    base, _, tag = name.partition(".")
    if base == CUSTOM:
        if tag:
            return _shape_of_tag(tag, name)
        base = variant_name("base", 16, 224)
    name = base
    for size, patch, res in _VARIANTS:
        if variant_name(size, patch, res) == name:
            w, d, h = CRATE_ALPHA_SIZES[size]
            return dict(embed_dim=w, depth=d, num_heads=h, patch_size=patch, img_size=res)
    raise ModelConfigError(unknown_model_message(name))


def list_crate_alpha_models() -> list:
    return [variant_name(*v) for v in _VARIANTS]


def unknown_model_message(name: str) -> str:
    return (f"unknown CRATE-α model {name!r}; known names: {', '.join(list_crate_alpha_models())} "
            f"(or {CUSTOM}.w{{width}}_d{{depth}}_h{{heads}}_patch{{P}}_{{res}} for another shape)")


# --------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------

def _check_released_shape(model: "CrateAlpha", info: Dict[str, Any], source: str) -> None:
    # info: the shape read by official_layout (width, depth, heads, patch)
    own = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0])
    theirs = (info["width"], info["depth"], info["heads"], info["patch"])
    if own != theirs:
        raise CheckpointError(f"{source} holds a CRATE-α of width {theirs[0]}, depth {theirs[1]}, {theirs[2]} heads, "
                         f"patch {theirs[3]}; the model asked for is {own[0]}, {own[1]}, {own[2]}, {own[3]}")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: "CrateAlpha") -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: an official checkpoint in this model's layout.

    The official classifier layout and the CLIPA image-text layout (its image tower, with
    the image projection as the head) are mapped by :mod:`.official_layout`, as the
    converters map them; a state dict already in timm's layout passes through.
    """
    if "state_dict" in state_dict or "model" in state_dict:  # the wrappers official_torch reads too
        state_dict = state_dict.get("state_dict", state_dict.get("model"))
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    heads = model.blocks[0].attn.num_heads
    layout = official_layout(state_dict) if "conv1.weight" in state_dict or \
        "visual.conv1.weight" in state_dict else "timm"
    if layout == "classifier":
        info, out = classifier_state(state_dict, heads)
        _check_released_shape(model, info, "the checkpoint")
        _check_head(model, info["num_classes"])
        return out
    if layout == "clipa":
        _, out = clipa_trunk_state(state_dict)
        return out
    return state_dict


def _check_head(model: "CrateAlpha", file_classes: int) -> None:
    # timm drops a checkpoint's head only when num_classes differs from the pretrained cfg's;
    # a file whose head differs from the cfg would otherwise fail in load_state_dict.
    cfg_classes = getattr(model, "pretrained_cfg", {}).get("num_classes")
    if file_classes != model.num_classes and model.num_classes == cfg_classes:
        raise CheckpointError(f"the checkpoint has a {file_classes}-class head and the model {model.num_classes} classes: "
                         f"pass num_classes={file_classes} to keep it, or another num_classes for a new head")


def _released_cfg(r: released.Release) -> Dict[str, Any]:
    cfg = pretrained_cfg(224, hf_hub_id=released.REPO, hf_hub_filename=r.path, num_classes=r.num_classes)
    if r.kind == "big_vision":
        cfg["custom_load"] = "hf"  # timm downloads from the Hub, then calls CrateAlpha.load_pretrained
    if r.kind == "clipa":
        # the CLIPA image tower: its head is the image projection; CLIPA's own preprocessing
        cfg.update(interpolation="bicubic", crop_pct=1.0)
    return cfg


default_cfgs = generate_default_cfgs({
    # timm's order: the first tag of a name is its default (timm.create_model(name, pretrained=True))
    **{r.name: _released_cfg(r) for r in released.RELEASES},
    # names without released weights: a cfg without a source
    **{variant_name(size, patch, res): pretrained_cfg(res) for size, patch, res in _VARIANTS
       if variant_name(size, patch, res) not in {r.model for r in released.RELEASES}},
    CUSTOM: pretrained_cfg(224),
})


def build_variant(cls, variant: str, pretrained: bool, args: Dict[str, Any], **build_kwargs: Any):
    """timm's ``build_model_with_cfg`` for CRATE and CRATE-α variants.

    Size arguments may override the name's, so the merged shape is checked again;
    ``features_only=True`` goes through timm's feature getter (forward_intermediates), as
    for ViTs.
    """
    check_shape_args(args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"], args["img_size"],
                     what=variant)
    out_indices = args.pop("out_indices", 3)
    build_kwargs.setdefault("pretrained_filter_fn", checkpoint_filter_fn)
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=dict(out_indices=out_indices,
                                                                          feature_cls="getter"),
                                **build_kwargs, **args)


def _create_crate_alpha(variant: str, pretrained: bool = False, **kwargs: Any) -> CrateAlpha:
    # The official PyTorch classifiers' head LayerNorm has torch's default eps (1e-5); a
    # pretrained cfg cannot set a model argument, so the tag that loads one sets it here.
    tag = kwargs.get("pretrained_cfg")
    if not isinstance(tag, str):
        tag = next((r.tag for r in released.RELEASES if r.model == variant), None) if pretrained else None
    r = released.by_name(f"{variant}.{tag}") if tag else None
    if r is not None and r.kind == "classifier":
        kwargs.setdefault("head_norm_eps", 1e-5)
    return build_variant(CrateAlpha, variant, pretrained, {**variant_args(variant), **kwargs})


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


@register_model
def crate_alpha_custom(pretrained: bool = False, pretrained_cfg=None, **kwargs) -> CrateAlpha:
    """CRATE-α of any shape: ``model_args`` (a timm folder's config.json) or the tag
    ``crate_alpha_custom.w{W}_d{D}_h{H}_patch{P}_{R}`` (an open_clip tower) gives it."""
    args = variant_args(CUSTOM)
    if isinstance(pretrained_cfg, str):  # the tag: timm hands the part after the dot to the entrypoint
        args = _shape_of_tag(pretrained_cfg, f"{CUSTOM}.{pretrained_cfg}")
        if pretrained:
            raise ModelConfigError(f"{CUSTOM}.{pretrained_cfg}: no released weights have this shape; "
                             "load a converted folder with local-dir: instead")
        pretrained_cfg = {**pretrained_cfg_of(args["img_size"]), "architecture": CUSTOM, "tag": ""}
    return build_variant(CrateAlpha, CUSTOM, pretrained, {**args, **kwargs}, pretrained_cfg=pretrained_cfg)


pretrained_cfg_of = pretrained_cfg
