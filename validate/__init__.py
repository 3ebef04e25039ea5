"""validate: the correctness oracle (issues 6 and 9). docs/VALIDATION.md explains every check.

    from validate import check_result, check_kernel, compare, run_suite, validate_checkpoint
    check_result(W, H, result, cfg).raise_if_failed()      # one layer's (q, scale, zero) [+ branch]
    run_suite("mypkg.quant:fn", "default").table()         # the conformance suite
    compare("reference", "numba", "default").ok            # two backends agree
    check_kernel(my_matmul).defects                        # a packed kernel, with named layout mistakes
    validate_checkpoint("ckpt_dir").ok                     # every packed layer vs its fake-quant weights

Everything here is NumPy-only at import; cvxpy (validate.exact), hypothesis
(validate.strategies) and torch (official checkpoints, bf16 kernel inputs) are imported where used.
"""

from .check import Policy, check_result
from .checkpoint import validate_checkpoint
from .compare import compare
from .conformance import load_suite, run_suite
from .kernel import check_kernel
from .report import Finding, Report

__all__ = ["Finding", "Policy", "Report", "check_kernel", "check_result", "compare", "load_suite", "run_suite",
           "validate_checkpoint"]
