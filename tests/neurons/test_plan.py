"""Kept-size rounding, rate checks, plan rows and slices, hand-checkable importance metrics and selection."""

from __future__ import annotations

import pytest
import torch

from centrifuge.neurons import LayerPlan, OmissionConfig, OmissionRateError, importance, kept_count, select


def test_kept_count_rounds_up_to_the_multiple_and_never_reaches_zero():
    assert kept_count(5632, 0.5, 64) == 2816  # TinyLlama: exactly the half-width MLP
    assert kept_count(5632, 0.3, 64) == 3968  # 0.7·5632 = 3942.4 → 62 blocks of 64
    assert kept_count(100, 0.5, 64) == 64
    assert kept_count(100, 0.3, 64) == 100  # rounding up past the size caps at the size
    assert kept_count(1000, 0.999, 64) == 64  # never zero
    assert kept_count(10, 0.99, 64) == 10  # smaller than one multiple: nothing to omit
    assert kept_count(4, 0.5) == 2 and kept_count(4, 0.9) == 1 and kept_count(4, 0.0) == 4  # KV groups
    assert kept_count(5632, 0.0, 64) == 5632


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_rates_give_one_clear_error(rate):
    message = r"omission rate must be in \[0, 1\)"
    with pytest.raises(OmissionRateError, match=message):
        kept_count(100, rate, 64)
    with pytest.raises(OmissionRateError, match=message):
        OmissionConfig(rate=rate)
    with pytest.raises(OmissionRateError, match=message):
        OmissionConfig(rate=0.5, schedule="linear", end=rate)
    assert issubclass(OmissionRateError, ValueError)


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="neurons.metric: unknown 'wandb'"):
        OmissionConfig(metric="wandb")
    with pytest.raises(ValueError, match="neurons.select"):
        OmissionConfig(select="random")
    with pytest.raises(ValueError, match="unknown keys ratio"):
        OmissionConfig.from_dict({"ratio": 0.5})


@pytest.mark.parametrize("value", [-1, 1.5, True, "4096"])
def test_config_rejects_a_bad_stat_token_count(value):
    with pytest.raises(ValueError, match="neurons.stat_tokens must be an integer ≥ 0"):
        OmissionConfig(stat_tokens=value)


def test_layer_plan_rows_follow_kv_groups():
    # 8 query heads, 4 KV groups (G = 2), head_dim 3: keep groups 2 and 0
    lp = LayerPlan.build(groups=[2, 0], num_groups=4, heads_per_group=2, head_dim=3, channels=[5, 1],
                         num_channels=8)
    assert lp.groups.tolist() == [0, 2] and lp.dropped_groups.tolist() == [1, 3]
    assert lp.channels.tolist() == [1, 5] and lp.dropped_channels.tolist() == [0, 2, 3, 4, 6, 7]
    assert lp.q_rows.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]  # heads 0, 1 and 4, 5
    assert lp.kv_rows.tolist() == [0, 1, 2, 6, 7, 8]
    assert lp.dropped_kv_rows.tolist() == [3, 4, 5, 9, 10, 11]
    assert lp.slices("down_proj") == (None, lp.channels) and lp.slices("o_proj") == (None, lp.q_rows)
    assert lp.slices("k_proj")[0] is lp.kv_rows


def test_magnitude_and_wanda_on_hand_checkable_weights():
    gate = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # m = 2 channels, d = 2
    up = torch.tensor([[0.0, -4.0], [0.0, 0.0]])
    down = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # [d, m]
    assert importance.mlp_magnitude(gate, up, down).tolist() == pytest.approx([5.0, 5.0 ** 0.5])
    x_rms = torch.tensor([1.0, 2.0])
    assert importance.mlp_wanda(gate, up, x_rms).tolist() == [11.0, 2.0]

    # 4 query heads, 2 KV groups (G = 2), head_dim 1, hidden 1
    q = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    k = torch.tensor([[1.0], [0.0]])
    v = torch.tensor([[0.0], [-2.0]])
    o = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    kw = dict(heads_per_group=2, head_dim=1)
    assert importance.group_magnitude(q, k, v, o, **kw).tolist() == pytest.approx([7.0 ** 0.5, 30.0 ** 0.5])
    assert importance.group_wanda(q, k, v, torch.tensor([2.0]), **kw).tolist() == [8.0, 18.0]


def test_activation_statistics_on_hand_checkable_tensors():
    x = torch.tensor([[[3.0, 1.0], [4.0, -1.0]]])  # [B=1, S=2, n=2]
    assert importance.feature_rms(x).tolist() == pytest.approx([12.5 ** 0.5, 1.0])
    o = torch.tensor([[[[2.0], [0.0], [1.0], [1.0]], [[2.0], [0.0], [1.0], [-1.0]]]])  # [1, 2, 4 heads, 1]
    assert importance.group_activation(o, heads_per_group=2).tolist() == pytest.approx([2.0, 2.0])
    assert importance.group_activation(o, heads_per_group=1).tolist() == pytest.approx([2.0, 0.0, 1.0, 1.0])


def test_topk_keeps_the_highest_scores_sorted():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    kept, dropped = select(scores, 2, method="topk")
    assert kept.tolist() == [[1, 3], [0, 1]] and dropped.tolist() == [[0, 2], [2, 3]]


def test_sampling_is_seeded_and_follows_the_softmax_of_standardised_scores():
    scores = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        return select(scores, 64, method="sample", generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # near-zero temperature: sampling is top-k
    cold = select(scores, 64, method="sample", temperature=1e-6, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(cold, select(scores, 64, method="topk")[0])
    # keep 1 of [10, 0, 0, 0]: z = [√3, −1/√3 ×3] → P(unit 0) = e^√3 / (e^√3 + 3 e^(−1/√3)) ≈ 0.770
    rows = torch.tensor([[10.0, 0.0, 0.0, 0.0]]).expand(4000, 4)
    kept = select(rows, 1, method="sample", generator=torch.Generator().manual_seed(1))[0]
    z0, z1 = 3 ** 0.5, -(3 ** -0.5)
    p0 = torch.tensor(z0).exp() / (torch.tensor(z0).exp() + 3 * torch.tensor(z1).exp())
    assert (kept == 0).double().mean().item() == pytest.approx(p0.item(), abs=0.025)


def test_uniform_selection_covers_every_unit():
    kept, dropped = select(None, 2, shape=(500, 4), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(kept.flatten(), minlength=4)
    assert counts.min() > 200 and counts.sum() == 1000  # 250 each on average
    assert torch.equal(torch.cat([kept, dropped], 1).sort(1).values, torch.arange(4).expand(500, 4))


def test_dropped_slices_are_the_complements_of_the_kept_slices():
    lp = LayerPlan.build(groups=[2, 0], num_groups=4, heads_per_group=2, head_dim=3, channels=[5, 1, 8],
                         num_channels=11)
    sizes = {"gate_proj": 11, "up_proj": 11, "down_proj": 11, "q_proj": 24, "o_proj": 24, "k_proj": 12,
             "v_proj": 12}
    for name, size in sizes.items():
        kept, dropped = lp.slices(name), lp.dropped(name)
        dim = 0 if kept[0] is not None else 1
        assert kept[1 - dim] is None and dropped[1 - dim] is None
        both = torch.cat([kept[dim], dropped[dim]]).sort().values
        assert torch.equal(both, torch.arange(size)), name
    with pytest.raises(KeyError, match="lm_head"):
        lp.dropped("lm_head")
