"""validate: the correctness oracle. docs/VALIDATION.md explains every check.

    from validate import check_result, check_kernel, compare, run_suite, validate_checkpoint
    check_result(W, H, result, cfg).raise_if_failed()      # one layer's (q, scale, zero) [+ branch]
    run_suite("mypkg.quant:fn", "default").table()         # the conformance suite
    compare("reference", "numba", "default").ok            # two backends agree
    assert_agree(W, H, cfg, ref_result, result, NUMBA)     # the same, for one layer in a test
    compare_checkpoints("q_numba", "q_cuda").loss_ratio_max  # two checkpoints, layer by layer
    check_kernel(my_matmul).defects                        # a packed kernel, with named layout mistakes
    validate_checkpoint("ckpt_dir").ok                     # every packed layer vs its fake-quant weights
    check_q4_1(result, q, d, m).ok                         # W4 g32 on a Q4_1-rounded weight: llama.cpp's integers
    check_gguf_export("m.gguf", "qmodel/").ok              # an exported GGUF, read back by gguf-py, is its checkpoint

Modules, each importing only those above it: report, policy (tolerances), adapters
(conventions, loading an implementation), suite (cases, manifest, hashes), exact, layout,
check, kernel, checkpoint, ggml_q4_1, gguf_export, compare, conformance (strategies and official_style stand
alone); the scripts make_suite, ggml_check and policy_evidence are run with ``python -m`` and not
imported here. tests/validate/test_validate_imports.py keeps it so.

Everything here is NumPy-only at import; cvxpy (validate.exact), hypothesis
(validate.strategies), torch (official checkpoints, bf16 kernel inputs), safetensors (suite
files, checkpoints) and gguf (validate.ggml_q4_1) are imported where used.
"""

from .check import check_result
from .checkpoint import validate_checkpoint
from .compare import assert_agree, compare, compare_checkpoints
from .conformance import load_suite, run_suite
from .ggml_q4_1 import check_q4_1
from .gguf_export import check_gguf_export
from .kernel import check_kernel
from .policy import CUDA, NUMBA, Agreement, Policy
from .report import Finding, Report

__all__ = ["CUDA", "NUMBA", "Agreement", "Finding", "Policy", "Report", "assert_agree", "check_kernel",
           "check_gguf_export", "check_q4_1", "check_result", "compare", "compare_checkpoints", "load_suite", "run_suite",
           "validate_checkpoint"]
