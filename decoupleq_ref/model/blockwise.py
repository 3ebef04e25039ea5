"""The block-wise stage of decoupleQ: q frozen, scale/zero and norm weights trained with Adam so the
quantized block's output matches the float block's on the same (quantized-prefix) inputs:

    min_{s, z, γ}  mean ‖ block_{q, s, z, γ}(X) − block_fp(X) ‖²

Optimizer settings follow the official code: Adam, betas (0.9, 0.99), eps 2e-5, weight decay 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .torch_model import is_conv1d

ADAM = {"betas": (0.9, 0.99), "eps": 2e-5, "weight_decay": 1e-6}


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ = s·q + z per group (+ B on the fp16 branch's columns, docs/FORMAT.md);
    q and the branch B are frozen buffers, s and z are trained."""

    def __init__(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bias: torch.Tensor | None,
                 branch: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        self.register_buffer("q", torch.from_numpy(q.astype(np.float32)))
        self.scale = nn.Parameter(torch.from_numpy(scale.astype(np.float32)))
        self.zero = nn.Parameter(torch.from_numpy(zero.astype(np.float32)))
        self.bias = bias
        self.group = q.shape[1] // scale.shape[1]
        self.register_buffer("hp_index", None if branch is None else torch.from_numpy(branch[0].astype(np.int64)))
        self.register_buffer("hp_weight", None if branch is None else torch.from_numpy(branch[1].astype(np.float32)))

    def weight_hat(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(self.group, dim=1)  # noqa: E731
        W_hat = expand(self.scale) * self.q + expand(self.zero)
        return W_hat if self.hp_index is None else W_hat.index_add(1, self.hp_index, self.hp_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat(), self.bias)


@dataclass
class BlockwiseResult:
    scales: dict[str, np.ndarray]
    zeros: dict[str, np.ndarray]
    loss_before: float
    loss_after: float
    steps: int


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_mse(block: nn.Module, X: torch.Tensor, Y: torch.Tensor, kwargs: dict, batch: int = 8) -> float:
    """mean ‖block(X) − Y‖² over every element, in float64."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(X), batch):
            total += float(((call_block(block, X[i:i + batch], kwargs) - Y[i:i + batch]).double() ** 2).sum())
    return total / Y.numel()


def norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Weights of the block's LayerNorm / RMSNorm modules."""
    return [m.weight for m in block.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None]


def _swap(block: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def train_block(block: nn.Module, quant: dict[str, tuple], X: torch.Tensor, Y: torch.Tensor, kwargs: dict,
                epochs: int, lr: float, seed: int) -> BlockwiseResult:
    """Train (s, z) of the block's quantized linears (``quant``: name within block → (q, s, z,
    branch), branch = (hp_index, hp_weight) or None, kept frozen) and its norm weights for
    ``epochs`` passes over X, one window per Adam step, in a seeded order.
    The block keeps whichever of the start and the trained state has the lower loss; its linears
    are restored as ordinary modules (weights to be set by the caller from the returned s, z)."""
    originals = {}
    for name, (q, s, z, branch) in quant.items():
        module = block.get_submodule(name)
        if is_conv1d(module):
            raise ValueError("--block-epochs: the block-wise stage supports nn.Linear blocks only; pass --block-epochs 0")
        originals[name] = _swap(block, name, QuantLinear(q, s, z, module.bias, branch).to(module.weight.device))
    norms = norm_parameters(block)
    norm_start = [p.detach().clone() for p in norms]
    params = [p for n in quant for p in (block.get_submodule(n).scale, block.get_submodule(n).zero)] + norms
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        before = block_mse(block, X, Y, kwargs)
        opt = torch.optim.Adam(params, lr=lr, **ADAM)
        rng = np.random.default_rng(seed)
        steps = 0
        for _ in range(epochs):
            for i in rng.permutation(len(X)):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(call_block(block, X[i:i + 1], kwargs), Y[i:i + 1])
                loss.backward()
                opt.step()
                steps += 1
        after = block_mse(block, X, Y, kwargs)
        keep = after < before
        scales = {n: (block.get_submodule(n).scale.detach().cpu().numpy().copy() if keep else quant[n][1])
                  for n in quant}
        zeros = {n: (block.get_submodule(n).zero.detach().cpu().numpy().copy() if keep else quant[n][2])
                 for n in quant}
        if not keep:
            with torch.no_grad():
                for p, p0 in zip(norms, norm_start):
                    p.copy_(p0)
    finally:
        for name, module in originals.items():
            _swap(block, name, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return BlockwiseResult(scales, zeros, before, after, steps)
