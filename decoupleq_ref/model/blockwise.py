"""The block-wise stage of decoupleQ: q frozen, scale/zero and norm weights trained with Adam so the
quantized block's output matches a float target on the quantized prefix's outputs X:

    min_{s, z, γ}  mean ‖ block_{q, s, z, γ}(X) − Y ‖²

Y is the float block on the same X (``targets="quantized"``, the official code) or the float
model's own hidden states after this block (``targets="float"``: the block also learns to undo
the error the quantized prefix left in X). Optimizer settings follow the official code: Adam,
betas (0.9, 0.99), eps 2e-5, weight decay 1e-6; ``schedule="cosine"`` decays the learning rate to
zero over the steps. ``precision="bf16"`` runs forward and backward under torch.autocast in
bfloat16 (fp32 master parameters, fp32 loss): the CPU's AMX / AVX-512-BF16 units, or a GPU's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .train_config import BlockwiseConfig, ModelStageConfig
from .stage_times import StageTimes
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
        out, n_in = self.q.shape
        q = self.q.view(out, -1, self.group)  # (out, groups, group): s and z broadcast over a group
        W_hat = (self.scale[:, :, None] * q + self.zero[:, :, None]).view(out, n_in)
        return W_hat if self.hp_index is None else W_hat.index_add(1, self.hp_index, self.hp_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat(), self.bias)


@dataclass
class TrainedScales:
    scales: dict[str, np.ndarray]
    zeros: dict[str, np.ndarray]
    steps: int


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def output_mse(out: torch.Tensor, Y: torch.Tensor) -> float:
    """mean ‖out − Y‖² over every element, in float64."""
    return float(((out - Y).double() ** 2).sum()) / Y.numel()


def norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Weights of the block's LayerNorm / RMSNorm modules."""
    return [m.weight for m in block.modules() if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None]


def _swap(block: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def autocast(config: BlockwiseConfig | ModelStageConfig, device: torch.device):
    """The training precision's context: bf16 autocast, or nothing for fp32."""
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def adam_epochs(params: list[nn.Parameter], n: int, config: BlockwiseConfig | ModelStageConfig, seed: int,
                times: StageTimes, stage: str, loss_of: Callable[[int], torch.Tensor]) -> int:
    """``config.epochs`` passes over items 0..n-1 in a seeded order, one Adam step per item on
    ``loss_of(i)`` (run under the config's autocast), learning rate ``config.lr_at``; the forward,
    backward and optimizer parts timed as ``{stage} forward`` etc. Returns the steps taken."""
    device = params[0].device
    opt = torch.optim.Adam(params, lr=config.lr, **ADAM)
    rng = np.random.default_rng(seed)
    steps, total = 0, config.epochs * n
    for _ in range(config.epochs):
        for i in rng.permutation(n):
            for group in opt.param_groups:
                group["lr"] = config.lr_at(steps, total)
            opt.zero_grad(set_to_none=True)
            with times(f"{stage} forward"), autocast(config, device):
                loss = loss_of(int(i))
            with times(f"{stage} backward"):
                loss.backward()
            with times(f"{stage} optimizer"):
                opt.step()
            steps += 1
    return steps


@contextlib.contextmanager
def trainable_scales(root: nn.Module, quant: dict[str, tuple]) -> Iterator[list[nn.Parameter]]:
    """Swap each linear of ``root`` named in ``quant`` (name → (q, s, z, branch)) for a QuantLinear
    and freeze every parameter but their (s, z) and ``root``'s norm weights; yield those (the
    (s, z) first). On exit the original modules and every requires_grad flag are back."""
    originals: dict[str, nn.Module] = {}
    flags = {p: p.requires_grad for p in root.parameters()}
    try:
        for name, (q, s, z, branch) in quant.items():
            module = root.get_submodule(name)
            originals[name] = _swap(root, name, QuantLinear(q, s, z, module.bias, branch).to(module.weight.device))
        params = [p for n in quant for p in (root.get_submodule(n).scale, root.get_submodule(n).zero)]
        params += norm_parameters(root)
        for p in root.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for name, module in originals.items():
            _swap(root, name, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def train_block(block: nn.Module, quant: dict[str, tuple], X: torch.Tensor, Y: torch.Tensor, kwargs: dict,
                config: BlockwiseConfig, seed: int, times: StageTimes | None = None) -> TrainedScales:
    """Train (s, z) of the block's quantized linears (``quant``: name within block → (q, s, z,
    branch), branch = (hp_index, hp_weight) or None, kept frozen) and its norm weights towards
    ``Y`` for ``config.epochs`` passes over X, one window per Adam step, in a seeded order.
    Returns the trained (s, z); the norm weights are left trained and the linears restored as the
    ordinary modules they were (the caller measures the result and keeps the better state)."""
    times = times or StageTimes()
    if any(is_conv1d(block.get_submodule(name)) for name in quant):
        raise ValueError("--block-epochs: the block-wise stage supports nn.Linear blocks only; pass --block-epochs 0")
    with trainable_scales(block, quant) as params:
        steps = adam_epochs(params, len(X), config, seed, times, "blockwise",
                            lambda i: F.mse_loss(call_block(block, X[i:i + 1], kwargs).float(), Y[i:i + 1]))
        scales = {n: block.get_submodule(n).scale.detach().cpu().numpy().copy() for n in quant}
        zeros = {n: block.get_submodule(n).zero.detach().cpu().numpy().copy() for n in quant}
    return TrainedScales(scales, zeros, steps)
