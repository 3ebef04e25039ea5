"""The model-level stage of ``decoupleq run``, after every block is committed (this project's
addition; the paper's procedure ends with the block-wise stage). q stays frozen; every quantized
linear's (s, z) and every norm weight (the blocks' and the final one) are trained with Adam so
the quantized model's next-token distribution matches the float model's on the calibration
windows:

    min_{s, z, γ}  (1/T) Σ_t KL( p_fp(· | x_<t) ‖ p_q(· | x_<t) )

The block-wise stage matches each block's output in isolation; this one sees how the blocks'
errors add up at the logits, the quantity perplexity measures. The float model's distribution is
computed from its own last hidden states (carried through the float blocks during the run) by a
copy of its final norm and its (frozen) output head, so no second model is held. One window per
step, in a seeded order; the learning rate decays to zero by a cosine. The model keeps whichever
of the start and the trained state has the lower KL on the first CHECK_WINDOWS calibration
windows, measured in the training precision (each measurement is a whole-model forward per
window: on all 32 default windows the two would cost as much as the epoch that trains). When the
KL rose (a rate too large for a model already close to the float one, e.g. at 4 bits), the stage
starts over from the block-wise state at a tenth of the rate, up to ``retries`` times.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .blockwise import adam_epochs, autocast, norm_parameters, trainable_scales
from .stage_times import StageTimes
from .torch_model import model_device
from .train_config import ModelStageConfig, retry_rates


#: Calibration windows the keep-or-restore decision is measured on (all of them when fewer).
CHECK_WINDOWS = 8


@dataclass
class ModelStageResult:
    tensors: dict[str, np.ndarray]  # NAME.scales / NAME.zeros of every layer, every norm weight by name
    kl_before: float  # mean KL on the first ``kl_windows`` calibration windows
    kl_after: float
    steps: int
    kl_windows: int
    lr: float  # of the attempt that ended the stage

    @property
    def kept(self) -> str:
        return "trained" if self.kl_after < self.kl_before else "block stage"


class TeacherHead(nn.Module):
    """The float model's final norm (a copy, taken before the stage trains the model's own) and
    its output head (shared: frozen)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm = copy.deepcopy(model.model.norm).requires_grad_(False)
        self.head = model.get_output_embeddings()

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(self.head(self.norm(hidden)).float(), dim=-1)


def window_kl(model: nn.Module, window: np.ndarray, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the window's positions of KL(teacher ‖ model), teacher = float log-probabilities."""
    ids = torch.from_numpy(window)[None].to(model_device(model))
    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    return F.kl_div(logp, teacher, reduction="sum", log_target=True) / len(logp)


def mean_kl(model: nn.Module, windows: np.ndarray, hidden_fp: torch.Tensor, teacher: TeacherHead,
            config: ModelStageConfig) -> float:
    total = 0.0
    with torch.no_grad(), autocast(config, hidden_fp.device):
        for i, w in enumerate(windows):
            total += float(window_kl(model, w, teacher.log_probs(hidden_fp[i])))
    return total / len(windows)


def train_model(model: nn.Module, quant: dict[str, tuple], windows: np.ndarray, hidden_fp: torch.Tensor,
                teacher: TeacherHead, config: ModelStageConfig, seed: int, times: StageTimes | None = None
                ) -> ModelStageResult:
    """Train (s, z) of ``quant`` (full linear name → (q, s, z, branch), the branch frozen) and every
    norm weight of ``model`` towards the float distribution given by ``hidden_fp`` (n, seqlen, d:
    the float model's last hidden states on ``windows``) through ``teacher``. The model's linears
    are restored as ordinary modules afterwards and its norms left at the kept state; the caller
    sets the linears' weights from the returned tensors."""
    times = times or StageTimes()
    own = dict(model.named_parameters())
    norm_names = [n for n, p in own.items() if any(p is m for m in norm_parameters(model))]
    norm_start = {n: own[n].detach().clone() for n in norm_names}
    with trainable_scales(model, quant) as params:
        check = slice(0, min(len(windows), CHECK_WINDOWS))
        with times("model loss"):
            before = mean_kl(model, windows[check], hidden_fp[check], teacher, config)
        steps = 0
        for attempt, lr in enumerate(retry_rates(config.lr, config.retries)):
            if attempt:  # the KL rose: start over from the block-wise state at a tenth of the rate
                restore(model, quant, own, norm_start)
            steps += adam_epochs(params, len(windows), replace(config, lr=lr), seed, times, "model",
                                 lambda i: window_kl(model, windows[i], teacher.log_probs(hidden_fp[i])))
            with times("model loss"):
                after = mean_kl(model, windows[check], hidden_fp[check], teacher, config)
            if after < before:
                break
        if not after < before:
            restore(model, quant, own, norm_start)
        tensors = {}
        for name in quant:
            m = model.get_submodule(name)
            tensors[f"{name}.scales"] = m.scale.detach().cpu().numpy().copy()
            tensors[f"{name}.zeros"] = m.zero.detach().cpu().numpy().copy()
        for n in norm_names:
            tensors[n] = own[n].detach().cpu().numpy().copy()
    return ModelStageResult(tensors, before, after, steps, check.stop, lr)


def restore(model: nn.Module, quant: dict[str, tuple], own: dict[str, nn.Parameter],
            norms: dict[str, torch.Tensor]) -> None:
    """Put the stage's start back: every QuantLinear's (s, z) and the norm weights."""
    with torch.no_grad():
        for name, (q, s, z, branch) in quant.items():
            m = model.get_submodule(name)
            m.scale.copy_(torch.from_numpy(s.astype(np.float32)))
            m.zero.copy_(torch.from_numpy(z.astype(np.float32)))
        for n, value in norms.items():
            own[n].copy_(value)
