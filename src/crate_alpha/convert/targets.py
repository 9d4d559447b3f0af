"""What a converted checkpoint becomes: timm model arguments and open_clip model configs.

Shared by every source layout (official PyTorch, big_vision), which all describe the same
two models: a CRATE-α classifier and a CLIPA image-text model.
"""
from __future__ import annotations

from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..models.crate_alpha import (
    CRATE_ALPHA_SIZES,
    CUSTOM,
    _VARIANTS,
    custom_variant_name,
    list_crate_alpha_models,
    variant_args,
    variant_name,
)
from .folders import ConversionError

OPEN_CLIP_NAMES = {
    "crate-alpha-B-32": "crate_alpha_base_patch32_224",
    "crate-alpha-B-16": "crate_alpha_base_patch16_224",
    "crate-alpha-B-8": "crate_alpha_base_patch8_224",
    "crate-alpha-L-32": "crate_alpha_large_patch32_224",
    "crate-alpha-L-14": "crate_alpha_large_patch14_224",
    "crate-alpha-L-8": "crate_alpha_large_patch8_224",
    "crate-alpha-H-14": "crate_alpha_huge_patch14_224",
    "crate-alpha-CLIPA-L-14": "crate_alpha_large_patch14_224",
    "crate-alpha-CLIPA-H-14": "crate_alpha_huge_patch14_224",
}
# Text heads of the released CLIPA models (the official code uses width // 64).
CLIPA_TEXT_HEADS = {"crate-alpha-CLIPA-L-14": 16, "crate-alpha-CLIPA-H-14": 16}


def known_model_names() -> list:
    return list_crate_alpha_models() + list(OPEN_CLIP_NAMES)


def model_heads(model: Optional[str]) -> Optional[int]:
    """Vision heads of a named model (timm or open_clip name), or None when no name."""
    if model is None:
        return None
    timm_name = OPEN_CLIP_NAMES.get(model, model)
    try:
        return variant_args(timm_name)["num_heads"]
    except ValueError as e:
        if timm_name.startswith(CUSTOM + "."):  # a shape name, but an impossible shape: say which part
            raise ConversionError(str(e)) from None
        raise ConversionError(
            f"unknown model name {model!r}; CRATE-α names are: {', '.join(known_model_names())}"
        ) from None


def open_clip_text_cfg(model: Optional[str]) -> Optional[dict]:
    """The text tower of an open_clip CRATE-α config name (with ``embed_dim``), else None."""
    if model not in OPEN_CLIP_NAMES:
        return None
    import open_clip

    cfg = open_clip.get_model_config(model)
    return {**cfg["text_cfg"], "embed_dim": cfg["embed_dim"]} if cfg else None


def _named_text_heads(model: Optional[str]) -> Optional[int]:
    if model is None:
        return None
    return CLIPA_TEXT_HEADS.get(model) or (open_clip_text_cfg(model) or {}).get("heads")


def named_heads(model: str):
    """(vision heads, text heads or None) of a named model, for weights known to be that model
    but possibly not at its size (a released file at its Hub path: the name is the release's)."""
    return model_heads(model), _named_text_heads(model)


def check_named_shape(model: Optional[str], vision: dict, text: Optional[dict] = None) -> None:
    """Refuse weights whose shape is not the named model's: its head counts (which the weights
    do not hold) would be applied to another model, and the folder would compute something else.

    ``vision``: width, depth, patch, resolution read from the weights; ``text``: width, layers,
    vocabulary, context, embedding width of a CLIPA text tower, compared when the name is an
    open_clip one (a timm name has no text tower).
    """
    if model is None:
        return
    model_heads(model)  # an unknown name is refused with the known names
    a = variant_args(OPEN_CLIP_NAMES.get(model, model))
    named = {"width": a["embed_dim"], "depth": a["depth"], "patch": a["patch_size"], "resolution": a["img_size"]}
    found = dict(vision)
    text_cfg = open_clip_text_cfg(model) if text is not None else None
    if text_cfg is not None:
        named.update({"text width": text_cfg["width"], "text layers": text_cfg["layers"],
                      "vocabulary": text_cfg["vocab_size"], "context length": text_cfg["context_length"],
                      "embedding width": text_cfg["embed_dim"]})
        found.update(text)
    differ = [f"{k} {found[k]} (not {named[k]})" for k in named if k in found and found[k] != named[k]]
    if differ:
        raise ConversionError(
            f"the weights are not {model}: their {', '.join(differ)}; name the model they are, or pass "
            "--heads N (and --text-heads N) instead of --model for a model of another shape")


def _check_count(value: Optional[int], option: str) -> None:
    if value is not None and value < 1:
        raise ConversionError(f"{option} must be a positive number of heads, got {value}")


def resolve_heads(width: int, heads: Optional[int], model: Optional[str], what: str = "vision") -> int:
    """Head count: --heads, else --model, else the paper's size with this width."""
    _check_count(heads, "--heads")
    named = model_heads(model)
    if heads is not None and named is not None and heads != named:
        raise ConversionError(f"--heads {heads} contradicts --model {model}, which has {named} {what} heads: "
                              "give one of them")
    if heads is None:
        heads = named
    if heads is None:
        by_width = {w: h for w, _, h in CRATE_ALPHA_SIZES.values()}
        heads = by_width.get(width)
    if heads is None:
        raise ConversionError(
            f"cannot tell the {what} head count of width {width} from the weights (MSSA's shared "
            f"projection has no head axis); pass --heads N or --model NAME")
    if width % heads:
        raise ConversionError(f"{what} width {width} is not divisible by {heads} heads")
    return heads


def resolve_text_heads(width: int, text_heads: Optional[int], model: Optional[str]) -> int:
    _check_count(text_heads, "--text-heads")
    if width < 1:
        raise ConversionError(f"text width {width} must be at least 1")
    if model is not None:
        model_heads(model)  # validates the name
    named = _named_text_heads(model)
    if text_heads is not None and named is not None and text_heads != named:
        raise ConversionError(f"--text-heads {text_heads} contradicts --model {model}, which has {named} text heads: "
                              "give one of them")
    heads = text_heads or named or max(width // 64, 1)
    if width % heads:
        raise ConversionError(f"text width {width} is not divisible by {heads} heads; pass --text-heads N")
    return heads


def trunk_name(width: int, depth: int, heads: int, patch: int, res: int) -> str:
    """The fixed timm name of this shape, or else ``crate_alpha_custom.<shape>``.

    timm resolves both with no registration, in any process where crate_alpha is imported
    (which the start-up hook does when timm is): a folder naming one loads anywhere.
    """
    for size, p, r in _VARIANTS:
        if (CRATE_ALPHA_SIZES[size] == (width, depth, heads) and p == patch and r == res):
            return variant_name(size, p, r)
    name = custom_variant_name(width, depth, heads, patch, res)
    try:
        variant_args(name)  # checks the shape
        return name
    except ValueError as e:  # an impossible shape read from the weights: say which part
        raise ConversionError(str(e)) from None


def classifier_args(width, depth, heads, patch, res, num_classes, head_norm_eps, patch_bias=True):
    return dict(
        embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, img_size=res,
        num_classes=num_classes, global_pool="token", class_token=True, pos_embed="learn",
        patch_bias=patch_bias, head_norm_eps=head_norm_eps,
    )


def clipa_model_cfg(embed_dim, vision_name, res, vocab, context, text_width, text_heads, text_layers,
                    text_mlp_ratio=4.0) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": res,
            "timm_model_name": vision_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        },
        "text_cfg": {
            "context_length": context,
            "vocab_size": vocab,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
            "mlp_ratio": text_mlp_ratio,
            "pool_type": "last",
            "no_causal_mask": True,
            "act_kwargs": {"approximate": "tanh"},
            "norm_kwargs": {"eps": 1e-6},
            "hf_tokenizer_name": "bert-base-uncased",
            "tokenizer_kwargs": {"strip_sep_token": True},
        },
    }


def clipa_preprocess_cfg(res: int) -> dict:
    return {
        "size": res,
        "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
