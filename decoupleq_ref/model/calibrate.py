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


class HessianHooks:
    """Forward hooks summing XᵀX (float64) and counting tokens of each layer's input.

    ``stop_when_done``: raise StopForward as soon as every hooked layer has seen the current
    input, so the rest of the forward pass (not needed for H) is skipped."""

    def __init__(self, layers: dict[str, nn.Module], stop_when_done: bool = False) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.stop_when_done, self.names = stop_when_done, frozenset(layers)
        self.pending = set(self.names)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            self.sums[name] = self.sums.get(name, 0) + x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
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
