"""``decoupleq calibrate``: H = XᵀX/N per linear from the float model on random text windows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .progress import progress_bar
from .stats import CalibrationStats
from .text import check_seqlen
from .torch_model import find_linears, is_conv1d, model_device


class StopForward(Exception):
    """Raised from a hook to end a forward pass early, once everything needed was seen."""


#: Rows per float32 product XᵀX: each H entry sums at most this many float32 products before
#: it is added to the float64 total (relative rounding ~1e-6 of the entry's scale, far under
#: the 1 % damping), while the products stay large GEMMs.
PRODUCT_ROWS = 512


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of x (rows, d) as float64: float32 products over PRODUCT_ROWS rows at a time, summed in
    float64 (the activations are float32 already; float64 GEMMs cost 2-4x on a CPU)."""
    x = x.to(torch.float32)
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], PRODUCT_ROWS):
        c = x[i:i + PRODUCT_ROWS]
        total += (c.T @ c).to(torch.float64)
    return total


class HessianHooks:
    """Forward hooks summing XᵀX (float64, see gram) and counting tokens of each layer's input.
    Layers fed the same tensor (q/k/v, gate/up) share one product.

    ``stop_when_done``: raise StopForward as soon as every hooked layer has seen the current
    input, so the rest of the forward pass (not needed for H) is skipped."""

    def __init__(self, layers: dict[str, nn.Module], stop_when_done: bool = False) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.stop_when_done, self.names = stop_when_done, frozenset(layers)
        self.pending = set(self.names)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its product)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, gram(x.detach().reshape(-1, x.shape[-1])))
        return self._last[1]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            self.sums[name] = self.sums.get(name, 0) + self._product(x)
            self.tokens[name] = self.tokens.get(name, 0) + x.numel() // x.shape[-1]
            if self.stop_when_done:
                self.pending.discard(name)
                if not self.pending:
                    self.pending = set(self.names)
                    raise StopForward
        return hook

    def hessians(self) -> dict[str, np.ndarray]:
        """H = XᵀX / N for every layer that saw input."""
        return {n: (s / self.tokens[n]).cpu().numpy() for n, s in self.sums.items()}

    def remove(self) -> None:
        self._last = None
        for h in self.handles:
            h.remove()


def run_windows(model: nn.Module, windows: np.ndarray, description: str) -> None:
    """Forward every window through the model (no grad), one at a time."""
    device = model_device(model)
    with torch.inference_mode(), progress_bar(description, len(windows)) as advance:
        for w in windows:
            model(input_ids=torch.from_numpy(w)[None].to(device))
            advance()


def calibrate(model: nn.Module, windows: np.ndarray, info: dict) -> CalibrationStats:
    """Run the float model on ``windows`` (n, seqlen) and collect H for every linear."""
    check_seqlen(model.config, windows.shape[1])
    layers = find_linears(model)
    if not layers:
        raise ValueError("MODEL: no nn.Linear or Conv1D layer to quantize in this architecture")
    model.config.use_cache = False  # no KV cache: windows are independent
    hooks = HessianHooks(layers)
    try:
        run_windows(model, windows, "calibrate")
    finally:
        hooks.remove()
    hessians = hooks.hessians()
    meta = {}
    for name, m in layers.items():
        if name in hessians:
            n_in = hessians[name].shape[0]
            meta[name] = {"out": int(m.weight.numel() // n_in), "in": n_in, "transposed": is_conv1d(m)}
    return CalibrationStats({n: hessians[n] for n in meta}, meta,
                            {**info, "tokens": int(windows.size)})
