"""CRATE-α's operators in the form the official code computes them.

The official PyTorch release writes ODL as two ISTA steps in ``torch.einsum`` and MSSA as
explicit ``softmax(w w^T) w`` matmuls. ``crate_alpha.MSSA``/``ODL`` compute the same
functions through ``F.linear`` and ``scaled_dot_product_attention``. This module keeps
the official form in one place, for two users:

* the test oracle (tests/reference_official.py), which rebuilds official forward passes
  from raw state dicts;
* the benchmark (``crate_alpha.apps.bench``), which runs a whole CRATE-α model in this form
  (``official_form``) beside the model's own operators.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import MSSA, ODL
from ..errors import ModelConfigError

__all__ = ["ista", "mssa", "EinsumMSSA", "EinsumODL", "official_form"]


def ista(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, eta: float = 0.1, lmbda: float = 0.1) -> torch.Tensor:
    """ODL: two ISTA steps on the (d, r*d) dictionary D, decoded by D1 (official einsum form)."""
    z1 = F.relu(eta * torch.einsum("pd,nlp->nld", D, x) - eta * lmbda)
    dz1 = torch.einsum("dp,nlp->nld", D, z1)
    z2 = F.relu(z1 - eta * torch.einsum("pd,nlp->nld", D, dz1 - x) - eta * lmbda)
    return torch.einsum("dp,nlp->nld", D1, z2)


def mssa(x: torch.Tensor, U: torch.Tensor, out_w: torch.Tensor, heads: int,
         u_bias: Optional[torch.Tensor] = None, out_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSSA with explicit attention matmuls; U is query, key and value at once.

    The released models have no biases; they are accepted so that a model built with
    ``qkv_bias``/``proj_bias`` can still be run in this form.
    """
    b, n, d = x.shape
    w = F.linear(x, U, u_bias).reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)
    attn = torch.softmax(w @ w.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    out = (attn @ w).permute(0, 2, 1, 3).reshape(b, n, d)
    return F.linear(out, out_w, out_bias)


class EinsumMSSA(nn.Module):
    """Drop-in for an ``MSSA`` layer, computed by ``mssa``.

    It takes over the layer's own ``qkv``/``proj`` submodules, so parameter names (and
    state dicts) stay those of the model it came from.
    """

    def __init__(self, layer: MSSA) -> None:
        super().__init__()
        if layer.attn_drop:
            # The official inference code has no attention dropout to compare against.
            raise ModelConfigError("EinsumMSSA: attention dropout is not supported")
        self.num_heads = layer.num_heads
        self.qkv = layer.qkv
        self.proj = layer.proj
        self.proj_drop = layer.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ModelConfigError("EinsumMSSA: the official form has no attention mask")
        out = mssa(x, self.qkv.weight, self.proj.weight, self.num_heads, self.qkv.bias, self.proj.bias)
        return self.proj_drop(out)


class EinsumODL(nn.Module):
    """Drop-in for an ``ODL`` layer, computed by ``ista``, on the layer's own D and D1."""

    def __init__(self, layer: ODL) -> None:
        super().__init__()
        self.eta = layer.eta
        self.lmbda = layer.lmbda
        self.D = layer.D
        self.D1 = layer.D1
        self.drop = layer.drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(ista(x, self.D, self.D1, self.eta, self.lmbda))


def official_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose MSSA and ODL layers compute in the official form.

    The copy has the same parameter values and names (its state dict loads into the
    original and back); the original is left untouched, so both can be trained side by
    side with their own optimisers.
    """
    model = copy.deepcopy(model)
    # Collected first: replacing children while named_modules() walks them would skip some.
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (MSSA, ODL))]
    if not swaps:
        raise ModelConfigError("official_form: the model has no MSSA or ODL layer")
    for parent, name, child in swaps:
        setattr(parent, name, EinsumMSSA(child) if isinstance(child, MSSA) else EinsumODL(child))
    return model
