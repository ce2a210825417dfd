"""Oracle-measured evaluation of a prefix-controlled policy (paper Figures 5-6, Table 2).

``controllability`` sweeps prefix targets and scores responses with the world's oracle (never the
reward model); ``report`` turns the result into report.json / report.md / PNG figures.
"""

from .controllability import EvalError, compare_to_reference, evaluate_policy, spearman
from .report import format_summary, write_report

__all__ = ["EvalError", "compare_to_reference", "evaluate_policy", "spearman", "format_summary", "write_report"]
