"""The white-box operators of CRATE and CRATE-α, and their position embedding.

* :class:`MSSA` — multi-head subspace self-attention (both models): one projection U_k per
  head serves as query, key and value.
* :class:`SparseCodingLayer` — the base of the sparse-coding steps that take the MLP's place:
  :class:`ODL` (CRATE-α: two ISTA steps on an overcomplete d x 4d dictionary, decoded by a
  separate dictionary, residual) and :class:`ISTA` (CRATE: one ISTA step on a square
  dictionary, no residual).
* :func:`sincos_2d_pos_embed` — the fixed 2-D sin-cos embedding in big_vision's layout, and
  :func:`resample_pos_embed` — the one way both models resample a learned position grid of
  another resolution.

The operators say what they compute, so that tools looking inside a model (``crate_alpha.
whitebox.interpret``) ask the layer instead of reading its weights:

* attention operators have ``subspace_features(x)``: the per-head projections U_k^T z of
  their input, (B, heads, N, head_dim), and may have ``attention_map(x)``: the (B, heads,
  N, N) attention probabilities they apply;
* sparse-coding operators have ``sparse_code(x)``: the (B, N, K) code they compute, and
  ``reconstruct(z)``: the dictionary's synthesis D z of the input from a code (B, N, d).

``x`` is always the operator's own input: the tokens after the block's LayerNorm (norm1
before attention, norm2 before the sparse-coding step); the operators apply no
normalisation of their own. Any operator with these methods (a new one included) is
understood by interpret with no change there.

The signatures follow timm's ``Attention`` and ``Mlp``, so timm's ``Block`` builds them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from ..errors import ModelConfigError

__all__ = ["MSSA", "SparseCodingLayer", "ODL", "ISTA", "sincos_2d_pos_embed", "grid_of", "resample_pos_embed",
           "resample_pos_embed_on_load"]


# --------------------------------------------------------------------------------------
# Compression: multi-head subspace self-attention
# --------------------------------------------------------------------------------------

class MSSA(nn.Module):
    """Multi-head subspace self-attention.

    One bias-free projection U per head serves as query, key and value:
    ``softmax((xU)(xU)^T / sqrt(d_head)) (xU)``, heads concatenated, then the output
    projection (bias-free in CRATE-α, with a bias in CRATE). ``qkv`` holds the U_k of all
    heads stacked (its name is timm's, so state dicts keep timm's keys).
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
            raise ModelConfigError(f"MSSA: width {dim} is not divisible by {num_heads} heads")
        if qk_norm or scale_norm:
            raise ModelConfigError("MSSA has one shared q=k=v projection; qk_norm/scale_norm do not apply")
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

    def subspace_features(self, x: torch.Tensor) -> torch.Tensor:
        """U_k^T z of every token z of the input x (B, N, d): (B, heads, N, head_dim).

        These are at once the queries, keys and values the layer attends with.
        """
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities softmax(w w^T / sqrt(head_dim)), w = U_k^T z: (B, heads, N, N).

        Computed explicitly in float32 (the forward pass uses the fused kernel and never
        forms them), without dropout.
        """
        w = self.subspace_features(x).float()
        return ((w * self.head_dim ** -0.5) @ w.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        w = self.subspace_features(x)
        x = F.scaled_dot_product_attention(
            w, w, w,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


# --------------------------------------------------------------------------------------
# Sparsification: ISTA steps on a dictionary
# --------------------------------------------------------------------------------------

class SparseCodingLayer(nn.Module):
    """The base of CRATE's sparse-coding steps (CRATE-α's ODL, CRATE's ISTA).

    They take the place of timm's ``Mlp`` in timm's ``Block``, which builds them with
    ``Mlp``'s signature: ``act_layer``, ``norm_layer`` and ``bias`` are accepted and unused,
    ``drop`` is output dropout. ``eta`` is the ISTA step size, ``lmbda`` the sparsity
    penalty. Subclasses create their dictionaries in ``build`` and define
    ``sparse_code(x)`` (the code of the input x, as the layer receives it: after the
    block's norm2) and ``reconstruct(z)`` (the dictionary's synthesis D z of the input).
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
            raise ModelConfigError(f"{type(self).__name__} maps the residual stream to itself: out_features must equal "
                             f"in_features ({in_features}), got {out_features}")
        self.eta = eta
        self.lmbda = lmbda
        self.build(in_features, hidden_features, {"device": device, "dtype": dtype})
        self.drop = nn.Dropout(drop)
        self.init_weights()

    def build(self, in_features: int, hidden_features: Optional[int], dd: Dict[str, Any]) -> None:
        raise NotImplementedError

    def init_weights(self) -> None:
        raise NotImplementedError

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ODL(SparseCodingLayer):
    """Overcomplete dictionary learning: two ISTA steps, then decoding.

    With D, D1 of shape (d, r*d) and eta = lambda = 0.1::

        z1 = relu(eta * x D - eta * lambda)
        z2 = relu(z1 - eta * (z1 D^T - x) D - eta * lambda)
        out = z2 D1^T

    ``hidden_features`` is the dictionary size (default 4d). ``sparse_code`` is z2,
    ``reconstruct`` decodes with the sparse-coding dictionary D (z2 D^T), not D1, which
    maps the code back into the residual stream.
    """

    def build(self, in_features: int, hidden_features: Optional[int], dd: Dict[str, Any]) -> None:
        hidden_features = hidden_features or 4 * in_features
        self.D = nn.Parameter(torch.empty(in_features, hidden_features, **dd))
        self.D1 = nn.Parameter(torch.empty(in_features, hidden_features, **dd))

    def init_weights(self) -> None:
        # kaiming-uniform on the (d, r*d) tensors, as the official code does.
        nn.init.kaiming_uniform_(self.D)
        nn.init.kaiming_uniform_(self.D1)

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        """z2 of the input x (B, N, d): (B, N, r*d)."""
        eta, shrink = self.eta, self.eta * self.lmbda
        Dt = self.D.t()
        z1 = F.relu(eta * F.linear(x, Dt) - shrink)
        residual = F.linear(z1, self.D) - x
        return F.relu(z1 - eta * F.linear(residual, Dt) - shrink)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.linear(self.sparse_code(x), self.D1))

    def extra_repr(self) -> str:
        return f"dict={tuple(self.D.shape)}, eta={self.eta}, lmbda={self.lmbda}"


class ISTA(SparseCodingLayer):
    """One ISTA step on a square dictionary, CRATE's sparse-coding block.

    With ``D x := F.linear(x, weight)`` (``weight`` of shape (d, d))::

        out = relu(x + eta * D^T (x - D x) - eta * lambda)

    The output is the sparse code itself (``sparse_code``; ``reconstruct`` is D z).
    ``hidden_features`` must be the width (or None). ``drop`` is output dropout (the
    original accepts a dropout rate and ignores it; its models use 0).
    """

    def build(self, in_features: int, hidden_features: Optional[int], dd: Dict[str, Any]) -> None:
        if hidden_features not in (None, in_features):
            raise ModelConfigError(f"ISTA's dictionary is square: hidden_features must equal in_features ({in_features}), "
                             f"got {hidden_features}")
        self.weight = nn.Parameter(torch.empty(in_features, in_features, **dd))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight)  # the original's init (a=0)

    def init_weights(self) -> None:
        # timm's init hook: keep the original's kaiming-uniform dictionary.
        self.reset_parameters()

    def sparse_code(self, x: torch.Tensor) -> torch.Tensor:
        """z of the input x (B, N, d): (B, N, d), the layer's output before dropout."""
        residual = x - F.linear(x, self.weight)  # x - D x
        return F.relu(x + self.eta * F.linear(residual, self.weight.t()) - self.eta * self.lmbda)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.sparse_code(x))

    def extra_repr(self) -> str:
        return f"dict={tuple(self.weight.shape)}, eta={self.eta}, lmbda={self.lmbda}"


# --------------------------------------------------------------------------------------
# Position embedding
# --------------------------------------------------------------------------------------

def sincos_2d_pos_embed(grid: Tuple[int, int], dim: int, temperature: float = 10000.) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding in big_vision's layout: [sin x, cos x, sin y, cos y].

    Written here because timm's builder orders the four blocks differently, and the
    paper's JAX checkpoints expect big_vision's order.
    """
    if dim % 4:
        raise ModelConfigError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                          indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float32) / max(dim // 4 - 1, 1)
    omega = 1. / temperature ** omega
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def grid_of(num_tokens: int, what: str) -> Tuple[int, int]:
    """The square grid of ``num_tokens`` position tokens; ValueError naming ``what`` otherwise."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ModelConfigError(f"{what}: {num_tokens} position tokens do not form a square grid")
    return side, side


def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], num_prefix_tokens: int,
                       what: str = "pos_embed") -> torch.Tensor:
    """A learned (1, prefix + h*w, d) position embedding of a square grid, resampled to ``grid``.

    Bilinear without antialiasing (as the official fine-tuning at another resolution);
    the ``num_prefix_tokens`` leading slots (class / register tokens) are kept as they are.
    """
    old = grid_of(pos_embed.shape[1] - num_prefix_tokens, what)
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(old),
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bilinear", antialias=False)


def resample_pos_embed_on_load(model: nn.Module, state_dict: Dict[str, torch.Tensor], key: str) -> None:
    """Replace ``state_dict[key]`` by its resampling to ``model``'s grid when the grid differs.

    For a timm VisionTransformer's ``_load_from_state_dict``, so that every loader (timm,
    open_clip, plain torch) gets it; a tensor of another width or rank is left for
    ``load_state_dict`` to refuse.
    """
    own = getattr(model, "pos_embed", None)
    src = state_dict.get(key)
    if own is None or src is None:
        return
    if src.ndim == 3 and src.shape[-1] == own.shape[-1] and src.shape[1] != own.shape[1]:
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state_dict[key] = resample_pos_embed(src, model.patch_embed.grid_size, n_prefix, f"checkpoint {key}")
