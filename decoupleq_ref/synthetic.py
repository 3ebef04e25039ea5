"""Deterministic synthetic layers: a weight and a Hessian with the structure of real LLM layers
(heavy-tailed weights, a few outlier input channels, correlated activations)."""

from __future__ import annotations

import numpy as np


def synthetic_layer(out: int = 256, n_in: int = 512, n_tokens: int = 2048, seed: int = 0,
                    outlier_channels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Return (W, H) with W (out, in) Student-t weights and H = XᵀX/N from correlated activations.

    X has a low-rank shared component plus noise, and ``outlier_channels`` input channels with
    10× larger activations, as seen in transformer hidden states.
    """
    rng = np.random.default_rng(seed)
    W = rng.standard_t(df=5, size=(out, n_in)) * 0.02
    rank = max(1, n_in // 16)
    X = rng.standard_normal((n_tokens, rank)) @ rng.standard_normal((rank, n_in)) / np.sqrt(rank)
    X += 0.5 * rng.standard_normal((n_tokens, n_in))
    X[:, rng.choice(n_in, size=min(outlier_channels, n_in), replace=False)] *= 10.0
    H = X.T @ X / n_tokens
    return W, (H + H.T) / 2
