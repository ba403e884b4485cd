"""The quality gate: a pure decision over the two stored perplexities and the spec's limits.

The operator recomputes the increase from the two perplexities instead of trusting the Job's
own ``passed``: the Job reports, the operator decides (and re-decides when a limit changes).
"""

from __future__ import annotations

from dataclasses import dataclass

from qmodel_operator.spec import Validation


@dataclass(frozen=True)
class Verdict:
    passed: bool
    increase_percent: float
    message: str


def increase_percent(baseline: float, quantized: float) -> float:
    return (quantized / baseline - 1.0) * 100.0


# Float rounding puts 10 -> 10.2 at +2.0000000000000018%; a limit is met up to this slack
# (perplexities carry at most ~7 significant digits, so 1e-9 points is below any real change).
SLACK_PERCENT = 1e-9


def decide(baseline: float, quantized: float, limits: Validation) -> Verdict:
    increase = increase_percent(baseline, quantized)
    limit = limits.max_perplexity_increase_percent
    numbers = f"perplexity {baseline:.4g} -> {quantized:.4g} ({increase:+.2f}%)"
    if increase > limit + SLACK_PERCENT:
        return Verdict(
            False,
            increase,
            f"{numbers} exceeds the {limit:g}% limit of spec.validation.maxPerplexityIncreasePercent",
        )
    if limits.max_perplexity is not None and quantized > limits.max_perplexity:
        return Verdict(
            False,
            increase,
            f"{numbers}: {quantized:.4g} exceeds spec.validation.maxPerplexity {limits.max_perplexity:g}",
        )
    return Verdict(True, increase, f"{numbers} is within the {limit:g}% limit")
