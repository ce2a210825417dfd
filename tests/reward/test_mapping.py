"""Reward mapping (Eq. 11) and running class statistics: against loop-based references."""

import math
from types import SimpleNamespace

import pytest
import torch

from moslim_mega.reward.mapping import MappingError, RewardMapper, RunningClassStats, from_config

NUM_CLASSES = [3, 5, 2]


def _random_probs(batch, num_classes=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, k, generator=g).mul(2).softmax(-1) for k in num_classes]


def _random_targets(batch, num_classes=NUM_CLASSES, seed=1):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(-1, k, (batch,), generator=g) for k in num_classes]
    targets = torch.stack(cols, dim=1)
    targets[0] = -1  # one row with nothing named
    return targets


def _fitted_stats(mode="welford"):
    stats = RunningClassStats(NUM_CLASSES, mode=mode)
    stats.update(_random_probs(64, seed=5))
    return stats


def _eq11_reference(probs, targets, mean, std, std_floor, normalize_by):
    """Eq. 11 with explicit python loops over examples and heads."""
    out = []
    for b in range(targets.shape[0]):
        total, named = 0.0, 0
        for i in range(len(probs)):
            t = int(targets[b, i])
            if t < 0:
                continue
            named += 1
            total += (float(probs[i][b, t]) - float(mean[i][t])) / max(float(std[i][t]), std_floor)
        k = len(probs) if normalize_by == "all" else named
        out.append(total / k if k else 0.0)
    return torch.tensor(out)


@pytest.mark.parametrize("normalize_by", ["all", "named"])
def test_zscore_matches_loop_reference(normalize_by):
    stats = _fitted_stats()
    probs, targets = _random_probs(32), _random_targets(32)
    mapper = RewardMapper(stats, normalize_by=normalize_by)
    got = mapper(probs, targets)
    want = _eq11_reference(probs, targets, stats.mean, stats.std, 1e-3, normalize_by)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[0] == 0.0  # nothing named
    per_head = mapper.per_head(probs, targets)
    assert per_head.shape == (32, 3)
    assert bool((per_head[targets < 0] == 0).all())


def test_std_floor_applied():
    stats = RunningClassStats([2])
    stats.update([torch.tensor([[0.3, 0.7], [0.3, 0.7]])])  # zero std on both classes
    probs, targets = [torch.tensor([[0.5, 0.5]])], torch.tensor([[0]])
    got = RewardMapper(stats, std_floor=0.1)(probs, targets)
    torch.testing.assert_close(got, torch.tensor([(0.5 - 0.3) / 0.1]))


def test_clip_applied():
    stats = RunningClassStats([2])
    stats.update([torch.tensor([[0.3, 0.7], [0.3, 0.7]])])
    probs = [torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.3, 0.7]])]
    got = RewardMapper(stats, std_floor=0.1, clip=2.5)(probs, torch.tensor([[0], [0], [0]]))
    torch.testing.assert_close(got, torch.tensor([2.5, -2.5, 0.0]))


def test_logprob_hand_computed():
    probs = [torch.tensor([[0.2, 0.8], [0.5, 0.5]]), torch.tensor([[0.1, 0.6, 0.3], [0.0, 0.0, 1.0]])]
    targets = torch.tensor([[1, 0], [-1, 0]])
    stats = RunningClassStats([2, 3])  # unused by logprob: no fit required
    got_all = RewardMapper(stats, kind="logprob")(probs, targets)
    want_all = torch.tensor([(math.log(0.8) + math.log(0.1)) / 2, math.log(1e-12) / 2])
    torch.testing.assert_close(got_all, want_all)
    got_named = RewardMapper(stats, kind="logprob", normalize_by="named")(probs, targets)
    torch.testing.assert_close(got_named, torch.tensor([want_all[0].item(), math.log(1e-12)]))


def test_neg_abs_dist_hand_computed():
    probs = [torch.tensor([[0.1, 0.2, 0.3, 0.4]])]
    stats = RunningClassStats([4])
    mapper = RewardMapper(stats, kind="neg_abs_dist")
    # target 1: -(0.1·1 + 0.2·0 + 0.3·1 + 0.4·2) = -1.2 ; target 3: -(0.3 + 0.4 + 0.3) = -1.0
    torch.testing.assert_close(mapper(probs, torch.tensor([[1]])), torch.tensor([-1.2]))
    torch.testing.assert_close(mapper(probs, torch.tensor([[3]])), torch.tensor([-1.0]))
    torch.testing.assert_close(mapper(probs, torch.tensor([[-1]])), torch.tensor([0.0]))


def test_from_config_reads_fields():
    cfg = SimpleNamespace(kind="logprob", normalize_by="named", std_floor=0.05, clip=3.0)
    for mapper in (RewardMapper.from_config(_fitted_stats(), cfg), from_config(_fitted_stats(), cfg)):
        got = (mapper.kind, mapper.normalize_by, mapper.std_floor, mapper.clip)
        assert got == ("logprob", "named", 0.05, 3.0)


@pytest.mark.parametrize("splits", [[100], [1] * 100, [7, 50, 1, 42], [33, 0, 67]])
def test_welford_exact_regardless_of_split(splits):
    data = _random_probs(100, seed=3)
    stats = RunningClassStats(NUM_CLASSES)
    start = 0
    for n in splits:
        stats.update([p[start : start + n] for p in data])
        start += n
    assert stats.count == 100
    for i, p in enumerate(data):
        assert stats.mean[i].dtype == torch.float32
        torch.testing.assert_close(stats.mean[i], p.mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stats.std[i], p.std(0, unbiased=False), rtol=1e-5, atol=1e-7)


def test_welford_order_independent():
    data = _random_probs(60, seed=4)
    a, b = RunningClassStats(NUM_CLASSES), RunningClassStats(NUM_CLASSES)
    a.update([p[:20] for p in data]), a.update([p[20:] for p in data])
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    b.update([p[perm[:45]] for p in data]), b.update([p[perm[45:]] for p in data])
    for i in range(3):
        torch.testing.assert_close(a.mean[i], b.mean[i]), torch.testing.assert_close(a.std[i], b.std[i])


def test_ema_stationary_close_to_truth():
    g = torch.Generator().manual_seed(0)
    stats = RunningClassStats([4], mode="ema", momentum=0.9)
    true = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for _ in range(200):
        stats.update([(true + 0.05 * torch.randn(16, 4, generator=g))])
    torch.testing.assert_close(stats.mean[0], true, atol=0.01, rtol=0)
    torch.testing.assert_close(stats.std[0], torch.full((4,), 0.05), atol=0.01, rtol=0)
    # bias correction: a single batch gives its own mean, not (1 - momentum) times it
    one = RunningClassStats([4], mode="ema", momentum=0.9)
    one.update([true.expand(8, 4)])
    torch.testing.assert_close(one.mean[0], true)
    torch.testing.assert_close(one.std[0], torch.zeros(4), atol=1e-4, rtol=0)


def test_ema_weights_recent_data_more():
    ema, exact = RunningClassStats([2], mode="ema", momentum=0.9), RunningClassStats([2])
    for value in (0.0,) * 50 + (1.0,) * 10:
        batch = [torch.tensor([[1.0 - value, value]]).expand(4, 2)]
        ema.update(batch), exact.update(batch)
    assert exact.mean[0][1].item() == pytest.approx(10 / 60, abs=1e-6)
    assert ema.mean[0][1].item() == pytest.approx((1 - 0.9**10) / (1 - 0.9**60), abs=1e-5)
    assert ema.mean[0][1].item() > 0.6  # the last 10 of 60 batches dominate


@pytest.mark.parametrize("mode", ["welford", "ema"])
def test_state_dict_and_json_round_trip(mode, tmp_path):
    stats = RunningClassStats(NUM_CLASSES, mode=mode, momentum=0.8)
    for seed in range(3):
        stats.update(_random_probs(10, seed=seed))
    path = tmp_path / "stats.json"
    stats.to_json(path)
    loaded = RunningClassStats.from_json(path)
    assert (loaded.mode, loaded.momentum, loaded.count, loaded.num_classes) == (mode, 0.8, 30, NUM_CLASSES)
    for i in range(3):
        assert torch.equal(loaded.mean[i], stats.mean[i]) and torch.equal(loaded.std[i], stats.std[i])
    fresh = RunningClassStats(NUM_CLASSES)
    fresh.load_state_dict(stats.state_dict())
    assert fresh.mode == mode and torch.equal(fresh.std[1], stats.std[1])
    # the restored object keeps accumulating identically
    more = _random_probs(5, seed=9)
    stats.update(more), loaded.update(more)
    assert torch.equal(loaded.mean[2], stats.mean[2])
    stats.reset()
    assert stats.count == 0 and torch.equal(stats.mean[0], torch.zeros(3))


def test_bad_inputs_raise_mapping_error():
    stats = _fitted_stats()
    mapper = RewardMapper(stats)
    probs, targets = _random_probs(4), _random_targets(4)
    with pytest.raises(MappingError, match="expected 3 heads"):
        mapper(probs[:2], targets)
    nan_probs = [p.clone() for p in probs]
    nan_probs[1][2, 0] = float("nan")
    with pytest.raises(MappingError, match=r"head 1\).*NaN"):
        mapper(nan_probs, targets)
    inf_probs = [p.clone() for p in probs]
    inf_probs[2][0, 1] = float("inf")
    with pytest.raises(MappingError, match=r"head 2\).*Inf"):
        stats.update(inf_probs)
    bad_t = targets.clone()
    bad_t[1, 2] = 2
    with pytest.raises(MappingError, match=r"head 2\): target 2 outside"):
        mapper(probs, bad_t)
    bad_t[1, 2] = -2
    with pytest.raises(MappingError, match=r"head 2\): target -2"):
        mapper(probs, bad_t)
    with pytest.raises(MappingError, match="targets_BH: expected shape"):
        mapper(probs, targets[:3])
    with pytest.raises(MappingError, match=r"probs\[1\].*batch size 3"):
        mapper([probs[0], probs[1][:3], probs[2]], targets)
    with pytest.raises(MappingError, match=r"probs\[0\].*expected shape \[B, 3\]"):
        mapper([probs[1], probs[1], probs[2]], targets)
    with pytest.raises(MappingError, match="kind"):
        RewardMapper(stats, kind="softmax")
    with pytest.raises(MappingError, match="normalize_by"):
        RewardMapper(stats, normalize_by="some")
    with pytest.raises(MappingError, match="std_floor"):
        RewardMapper(stats, std_floor=0.0)
    with pytest.raises(MappingError, match="clip"):
        RewardMapper(stats, clip=-1.0)
    with pytest.raises(MappingError, match="mode"):
        RunningClassStats(NUM_CLASSES, mode="average")
    with pytest.raises(MappingError, match="momentum"):
        RunningClassStats(NUM_CLASSES, mode="ema", momentum=1.0)
    with pytest.raises(MappingError, match="stats: no examples"):
        RewardMapper(RunningClassStats(NUM_CLASSES))(probs, targets)
    with pytest.raises(MappingError, match="state.num_classes"):
        RunningClassStats([3, 5]).load_state_dict(stats.state_dict())
