"""Findings and reports of the oracle: every check gives one Finding, a Report collects them.

A Finding is named by a stable dotted check id (``structure.q_range``, ``loss.reference``, ...,
listed in docs/VALIDATION.md), has a status, a one-line message that names the defect, and the
offending rows / (row, group) pairs so that a failing implementation can be debugged on the
exact entries that are wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

PASS, FAIL, SKIP, INFO, HINT = "pass", "fail", "skip", "info", "hint"
STATUSES = (PASS, FAIL, SKIP, INFO, HINT)
MAX_LISTED = 8  # offending rows / groups listed in a message


@dataclass
class Finding:
    """The outcome of one check.

    check     dotted id, e.g. "structure.q_range"
    status    "pass" | "fail" | "skip" | "info" | "hint" (a hint names a likely defect behind
              a failure: "defect.swapped_scale_zero", ...)
    message   one line, naming the defect and what was expected
    rows      offending rows (all of them; messages list the first few)
    groups    offending (row, group) pairs
    value     the measured quantity (e.g. a loss ratio), when there is one
    limit     the bound it was held to
    """

    check: str
    status: str
    message: str
    rows: list[int] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)
    value: float | None = None
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status: {self.status!r} is not one of {STATUSES}")
        self.rows = [int(r) for r in self.rows]
        self.groups = [(int(r), int(g)) for r, g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = [list(p) for p in self.groups]
        return d

    def __str__(self) -> str:
        return f"[{self.status.upper():4}] {self.check}: {self.message}"


def list_rows(rows: Iterable[int], limit: int = MAX_LISTED) -> str:
    """'rows [0, 3, 5] ' or 'rows [0, 3, 5, ...] (12 in all)'."""
    rows = [int(r) for r in rows]
    head = ", ".join(map(str, rows[:limit]))
    more = f", ... ({len(rows)} in all)" if len(rows) > limit else ""
    return f"rows [{head}{more}]"


def list_groups(pairs: Iterable[tuple[int, int]], limit: int = MAX_LISTED) -> str:
    """'(row, group) [(0, 1), (2, 0)]' with the same truncation as list_rows."""
    pairs = [(int(r), int(g)) for r, g in pairs]
    head = ", ".join(f"({r}, {g})" for r, g in pairs[:limit])
    more = f", ... ({len(pairs)} in all)" if len(pairs) > limit else ""
    return f"(row, group) [{head}{more}]"


def with_status(items: Iterable[Any], status: str) -> list[Any]:
    """The items (findings, case outcomes) whose ``.status`` is ``status``."""
    return [x for x in items if x.status == status]


def nonzero_rows(mask: np.ndarray) -> list[int]:
    """Rows of a 2-D mask with any True entry (or the True entries of a 1-D mask)."""
    mask = np.asarray(mask, dtype=bool)
    return np.nonzero(mask.any(axis=1) if mask.ndim == 2 else mask)[0].tolist()


@dataclass
class Report:
    """All findings for one (input, result) pair, plus the headline numbers.

    ``ok`` is True when no finding failed. ``numbers`` holds loss, objective, ratios to the
    reference and the optimum (None where not computed). ``defects`` lists the named likely
    causes found by the diagnosis (hints)."""

    case: str = ""
    findings: list[Finding] = field(default_factory=list)
    numbers: dict[str, float | None] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, status: str, message: str, **kw: Any) -> Finding:
        f = Finding(check, status, message, **kw)
        self.findings.append(f)
        return f

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Finding]:
        return with_status(self.findings, FAIL)

    @property
    def hints(self) -> list[Finding]:
        return with_status(self.findings, HINT)

    @property
    def defects(self) -> list[str]:
        """Names of the likely defects (the part after 'defect.' of each hint)."""
        return [f.check.split(".", 1)[1] for f in self.hints]

    @property
    def status(self) -> str:
        if self.failures:
            return FAIL
        if self.findings and all(f.status == SKIP for f in self.findings):
            return SKIP
        return PASS

    def finding(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    def summary(self) -> str:
        """One line: 'pass' or the failed checks and the named defects."""
        if self.ok:
            return self.status
        parts = [f.check for f in self.failures]
        if self.defects:
            parts.append("likely: " + ", ".join(self.defects))
        return "FAIL " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "status": self.status, "ok": self.ok, "numbers": self.numbers,
                "meta": self.meta, "defects": self.defects, "findings": [f.to_dict() for f in self.findings]}

    def __str__(self) -> str:
        head = f"{self.case or 'result'}: {self.status.upper()}"
        nums = ", ".join(f"{k}={v:.6g}" for k, v in self.numbers.items() if isinstance(v, float))
        lines = [head + (f"  ({nums})" if nums else "")]
        lines += ["  " + str(f) for f in self.findings if f.status != PASS]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """AssertionError with every failure and hint (for use inside other projects' tests)."""
        if not self.ok:
            raise AssertionError(str(self))
