"""The round schedule against the tables the original's README commands produce (docs/method.md §3.4)."""

import numpy as np
import pytest

from cbst.rounds import round_schedule, source_subset

# (p, s, n_src, iterations per epoch) for GTA -> Cityscapes, 24,966 source and 505 target images.
GTA_TABLE = [
    (0.15, 0.0300, 748, 626),
    (0.20, 0.0325, 811, 658),
    (0.25, 0.0350, 873, 689),
    (0.30, 0.0375, 936, 720),
    (0.35, 0.0400, 998, 751),
    (0.40, 0.0425, 1061, 783),
]
SYN_TABLE = [
    (0.20, 0.0200, 188, 346),
    (0.25, 0.0225, 211, 358),
    (0.30, 0.0250, 235, 370),
    (0.35, 0.0275, 258, 381),
    (0.40, 0.0300, 282, 393),
    (0.45, 0.0325, 305, 405),
]
LRS = [1.000e-4, 7.071e-5, 5.000e-5, 3.536e-5, 2.500e-5, 1.768e-5]


@pytest.mark.parametrize(
    "table,init_tgt,init_src,num_source", [(GTA_TABLE, 0.15, 0.03, 24966), (SYN_TABLE, 0.20, 0.02, 9400)]
)
def test_schedule_matches_readme_tables(table, init_tgt, init_src, num_source):
    plans = round_schedule(6, init_tgt_port=init_tgt, init_src_port=init_src, base_lr=1e-4)
    for plan, (p, s, n_src, iters), lr in zip(plans, table, LRS):
        assert plan.tgt_portion == pytest.approx(p, abs=1e-12)
        assert plan.src_portion == pytest.approx(s, abs=1e-12)
        assert int(num_source * plan.src_portion) == n_src
        assert (n_src + 505) // 2 == iters
        assert plan.lr == pytest.approx(lr, rel=1e-3)
        assert (plan.start_epoch, plan.end_epoch) == (2 * plan.index, 2 * plan.index + 2)


def test_portions_stop_growing_after_reaching_max_with_overshoot():
    plans = round_schedule(8, init_tgt_port=0.42, step_tgt_port=0.05, max_tgt_port=0.5, init_src_port=0.3)
    assert [round(p.tgt_portion, 6) for p in plans] == [0.42, 0.47, 0.52, 0.52, 0.52, 0.52, 0.52, 0.52]
    assert all(p.src_portion == 0.3 for p in plans)  # code default: s starts above its max


def test_lr_decay_and_seed_policies():
    plans = round_schedule(3, base_lr=1.0, seed=7, source_sample_policy="random")
    assert [p.source_seed for p in plans] == [0, 1, 2]
    assert plans[2].lr == pytest.approx(0.5)
    assert {p.source_seed for p in round_schedule(3, seed=7)} == {7}
    assert round_schedule(2, base_lr=1.0, lr_decay=1.0)[1].lr == 1.0
    with pytest.raises(ValueError, match="source_sample_policy"):
        round_schedule(2, source_sample_policy="fresh")


def test_source_subset_matches_legacy_numpy_and_is_nested_when_cumulative():
    np.random.seed(0)
    legacy = np.random.choice(24966, 748, replace=False)
    assert np.array_equal(source_subset(24966, 0.03, 0), legacy)
    small, large = source_subset(24966, 0.03, 0), source_subset(24966, 0.0325, 0)
    assert np.array_equal(large[: len(small)], small)
    assert len(set(source_subset(100, 0.5, 1)) ^ set(source_subset(100, 0.5, 2))) > 0
    assert len(source_subset(10, 0.35, 0)) == 3
