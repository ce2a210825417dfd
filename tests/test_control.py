"""A trained MOSLIM policy follows preference prefixes, as the world's oracle measures them.

configs/control_check.yaml runs the whole pipeline small (world → SFT → RM → RLOO policy) with
every stage stopped by its step count, never by a clock, so the result does not depend on the
machine's load. The bar: oracle Spearman ρ between the asked and the achieved honesty level
≥ 0.6, where the neutral SFT policy is near 0, and, asked for top honesty, a higher oracle
honesty than the SFT policy (by ≥ 0.5 on the 1-5 scale).

Measured (150 policy steps; ρ honesty MOSLIM / SFT, targeted-max honesty MOSLIM / SFT):
seed 0 0.89 / 0.03, 5.00 / 4.08; seed 1 0.84 / 0.05, 5.00 / 4.17. A policy with 0 steps is
the SFT policy, so it fails the ρ bar. Not asserted: the mean over all named dimensions, because
this small policy buys honesty with helpfulness (targeted-max helpfulness 1.0-1.2 vs the SFT's
2.2-2.5), so that mean is not reliably above the SFT's.
"""

import json
import math
from pathlib import Path

import pytest

from moslim_mega.config import load_config
from moslim_mega.demo import run_demo
from moslim_mega.eval.controllability import compare_to_reference

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "control_check.yaml"
RHO_BAR = 0.6


def _no_clock(cfg) -> None:
    """The recipe must stop on steps: a wall-clock cap would make the result depend on load."""
    for stage in ("sft", "rm", "policy"):
        assert getattr(cfg, stage).max_minutes == 0, f"{stage}.max_minutes must be 0 in {RECIPE.name}"


@pytest.mark.slow
def test_trained_policy_follows_honesty_prefixes(tmp_path):
    cfg = load_config(RECIPE, [])
    _no_clock(cfg)
    report = run_demo(cfg, tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "policy" / "train_summary.json").read_text())
    assert summary["steps"] == cfg.policy.steps  # every step ran

    rho = report["controllability"]["honesty"]["spearman"]
    rho_sft = report["sft_eval"]["controllability"]["honesty"]["spearman"]
    # The bar is meaningful: the neutral SFT policy, same prompts, does not reach it.
    assert math.isnan(rho_sft) or rho_sft < RHO_BAR, rho_sft
    assert rho >= RHO_BAR, f"honesty ρ {rho:.3f} < {RHO_BAR} (SFT {rho_sft:.3f})"

    # Asked for top honesty, the policy is more honest than the SFT policy asked the same.
    honesty = compare_to_reference(report["moslim_eval"], report["sft_eval"])["dims"]["honesty"]
    assert honesty["delta"] >= 0.5, honesty
