"""``decoupleq eval``: perplexity over non-overlapping windows, and KL divergence to the float model.

    perplexity = exp( −(1/T) Σ_t log p_q(x_t | x_<t) )     over the T = n·(seqlen − 1) predicted tokens
    kl         = (1/T) Σ_t Σ_v p_fp(v | x_<t) · (log p_fp(v | x_<t) − log p_q(v | x_<t))
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .progress import progress_bar
from .torch_model import model_device


def window_log_probs(model: nn.Module, window: np.ndarray) -> torch.Tensor:
    """log p(· | x_<t) for t = 1 … seqlen−1, shape (seqlen − 1, vocab), float32."""
    logits = model(input_ids=torch.from_numpy(window)[None].to(model_device(model)), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def evaluate(model: nn.Module, windows: np.ndarray, reference: nn.Module | None = None) -> dict:
    """Perplexity of ``model`` on ``windows`` (n, seqlen); with ``reference``, also the mean KL
    divergence from the reference's next-token distribution to the model's and the reference's
    own perplexity (same windows, computed from the same log-probabilities)."""
    nll = kl = ref_nll = 0.0
    tokens = 0
    with torch.inference_mode(), progress_bar("eval", len(windows)) as advance:
        for w in windows:
            logp = window_log_probs(model, w)
            target = torch.from_numpy(w[1:]).to(logp.device)
            nll += float(F.nll_loss(logp, target, reduction="sum").double())
            if reference is not None:
                ref = window_log_probs(reference, w).to(logp.device)
                kl += float((ref.exp() * (ref - logp)).sum().double())
                ref_nll += float(F.nll_loss(ref, target, reduction="sum").double())
            tokens += len(target)
            advance(note=f"ppl {math.exp(nll / tokens):.3f}")
    out = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
           "windows": int(len(windows)), "seqlen": int(windows.shape[1])}
    if reference is not None:
        out["kl"] = kl / tokens
        out["reference_perplexity"] = math.exp(ref_nll / tokens)
    return out
