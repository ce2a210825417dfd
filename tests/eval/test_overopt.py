"""The on-policy over-optimisation measurement (moslim_mega/eval/overopt.py)."""

import math

import pytest
import torch

from moslim_mega.config import MappingConfig
from moslim_mega.eval.overopt import OracleMonitor, detect_overoptimisation
from moslim_mega.policy.workers import RewardOutput
from moslim_mega.prefs import spec_from_config
from moslim_mega.config import PrefsConfig
from moslim_mega.reward.mapping import RewardMapper, RunningClassStats

SPEC = spec_from_config(PrefsConfig(datatype=4))


def _mapper():
    stats = RunningClassStats(SPEC.num_classes)
    g = torch.Generator().manual_seed(0)
    stats.update([torch.softmax(torch.randn(64, k, generator=g), -1) for k in SPEC.num_classes])
    return RewardMapper.from_config(stats, MappingConfig())


class _Rewarder:
    def __init__(self):
        self.mapper = _mapper()


def test_monitor_agrees_with_an_oracle_shaped_rm_and_not_with_an_inverted_one():
    prompts, responses, targets, good, bad = [], [], [], [], []
    # <helpfulness 5> cooking: more on-topic facts → closer to the target (oracle helpfulness 1 + n).
    for n in range(5):
        for _ in range(4):
            prompts.append("<helpfulness 5>tell me about cooking")
            responses.append(" ".join(["cooking_fact_a", "cooking_fact_b", "cooking_myth_a", "cooking_myth_b"][:n])
                             or "no idea")
            targets.append([4, -1, -1])
            good.append([float(n), 0.0, 0.0])
            bad.append([-float(n), 0.0, 0.0])
    t = torch.tensor(targets)
    mon = OracleMonitor(SPEC)
    rw = _Rewarder()
    hi = mon(prompts, responses, RewardOutput(torch.zeros(len(t)), torch.tensor(good), t), rw)
    lo = mon(prompts, responses, RewardOutput(torch.zeros(len(t)), torch.tensor(bad), t), rw)
    assert hi["agree_helpfulness"] == pytest.approx(1.0)
    assert lo["agree_helpfulness"] == pytest.approx(-1.0)
    assert "agree_honesty" not in hi  # honesty is never named: no rows to rank
    # oracle helpfulness = 1 + n → class n; |class − 4| averaged over n = 0..4 = 2
    assert hi["oracle_mae"] == pytest.approx(2.0)
    # the oracle reward goes through the RM's own Eq. 11 mapping (same units as the RM's reward)
    onehot = [torch.nn.functional.one_hot(torch.tensor([min(n, 4) for n in range(5) for _ in range(4)]), 5).float(),
              torch.nn.functional.one_hot(torch.full((20,), 4), 5).float(),
              torch.nn.functional.one_hot(torch.ones(20, dtype=torch.long), 2).float()]
    assert hi["oracle_reward"] == pytest.approx(float(rw.mapper(onehot, t).mean()), abs=1e-6)
    assert hi["rm_oracle_gap"] == pytest.approx(-hi["oracle_reward"], abs=1e-6)


def _history(gold, proxy, kl=None):
    return [{"reward": p, "oracle_reward": g, "kl": (kl or [0.0] * len(gold))[i], "agree": 0.5}
            for i, (g, p) in enumerate(zip(gold, proxy))]


def test_detector_flags_gold_falling_while_proxy_rises():
    n = 400
    proxy = [i / n for i in range(n)]
    gold = [min(i, 150) / 150 - max(0, i - 150) / 100 for i in range(n)]  # peaks at 150, then falls by 2.5
    out = detect_overoptimisation(_history(gold, proxy, [i / 40 for i in range(n)]))
    assert out["detected"]
    assert 140 <= out["oracle_peak_step"] <= 200
    assert out["oracle_drop_from_peak"] > 1.0
    assert out["kl_final"] > out["kl_at_peak"]
    assert len(out["curve"]["kl"]) <= 100


@pytest.mark.parametrize("case", ["both_rise", "both_fall", "flat"])
def test_detector_is_quiet_when_proxy_and_gold_move_together(case):
    n = 400
    ramp = {"both_rise": [i / n for i in range(n)], "both_fall": [1 - i / n for i in range(n)], "flat": [0.3] * n}[case]
    out = detect_overoptimisation(_history(ramp, ramp))
    assert not out["detected"], out


def test_detector_without_oracle_says_so():
    out = detect_overoptimisation([{"reward": 1.0}] * 10)
    assert out == {"detected": False, "reason": "no oracle_reward in the history"}
    assert detect_overoptimisation(_history([0.1, 0.2, 0.3, 0.4], [0.1] * 4))["agree_final"] == pytest.approx(0.5)


def test_detector_flags_a_widening_gap_and_a_collapsed_agreement():
    """Seeds 0 and 1 of the demo before issue 18's fix: the oracle reward never fell — it stalled
    while the RM's rose (gap +0.20) and the RM stopped ranking helpfulness like the oracle."""
    n = 400
    proxy = [0.8 * i / n for i in range(n)]
    gold = [0.5 * i / n for i in range(n)]  # rises too, never falls: no Gao peak
    hist = _history(gold, proxy)
    for i, row in enumerate(hist):
        row["agree_helpfulness"] = 0.7 - 0.65 * i / n
        row["agree_honesty"] = 0.5 + 0.1 * i / n
    out = detect_overoptimisation(hist)
    assert out["detected"] and out["signals"] == ["gap_grew", "agreement_fell"]
    assert out["agreement_fell"] == ["helpfulness"]
    assert out["rm_oracle_gap_final"] - out["rm_oracle_gap_first"] == pytest.approx(0.3 * (n - 1 - 49) / n, abs=0.02)
    # the same run with the RM and the oracle moving together is clean
    calm = _history(gold, [g + 0.02 for g in gold])
    for row in calm:
        row["agree_helpfulness"] = 0.6
    assert detect_overoptimisation(calm)["signals"] == []
