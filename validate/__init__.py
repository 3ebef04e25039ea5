"""validate: the correctness oracle (issues 6 and 9). docs/VALIDATION.md explains every check.

    from validate import check_result, check_kernel, compare, run_suite, validate_checkpoint
    check_result(W, H, result, cfg).raise_if_failed()      # one layer's (q, scale, zero) [+ branch]
    run_suite("mypkg.quant:fn", "default").table()         # the conformance suite
    compare("reference", "numba", "default").ok            # two backends agree
    compare_checkpoints("q_numba", "q_cuda").loss_ratio_max  # two checkpoints, layer by layer
    check_kernel(my_matmul).defects                        # a packed kernel, with named layout mistakes
    validate_checkpoint("ckpt_dir").ok                     # every packed layer vs its fake-quant weights
    check_q4_1(result, q, d, m).ok                         # W4 g32 on a Q4_1-rounded weight: llama.cpp's integers
    check_gguf_export("m.gguf", "qmodel/").ok              # an exported GGUF, read back by gguf-py, is its checkpoint

Everything here is NumPy-only at import; cvxpy (validate.exact), hypothesis
(validate.strategies), torch (official checkpoints, bf16 kernel inputs) and gguf (validate.ggml_q4_1)
are imported where used.
"""

import importlib
from typing import Any

_EXPORTS = {"Policy": "check", "check_q4_1": "ggml_q4_1", "check_gguf_export": "gguf_export", "check_result": "check", "validate_checkpoint": "checkpoint", "compare": "compare", "compare_checkpoints": "compare",
            "load_suite": "conformance", "run_suite": "conformance", "check_kernel": "kernel",
            "Finding": "report", "Report": "report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Lazy exports: ``python -m validate.make_suite`` must not import itself through the package."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'validate' has no attribute {name!r}")
