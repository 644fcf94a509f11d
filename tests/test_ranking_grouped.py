"""gauc and NDCG@k of MultiTaskRankingMetrics (groups): values against a per-group Python loop."""

import math
import warnings

import pytest
import torch

from losses import MultiTaskRankingMetrics, _grouped
from losses._grouped import group_rows, grouped_sums
from tests.ranking_reference import group_metrics

TASKS = ["click", "fav", "reply"]
RATES = [1.0, 0.5, 0.2]
KS = (1, 3, 10)


def grouped_batch(size, seed, groups=40, dtype=torch.float64, ties=False):
    """Rows of ``groups`` shuffled groups (random big ids), weights, a mask with NaN labels under it."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, 3, generator=gen, dtype=torch.float64) * 2 - 1
    if ties:  # a few distinct values: many ties inside groups
        logits = (logits * 2).round() / 2
    mask = torch.rand(size, 3, generator=gen) < 0.8
    labels = (torch.rand(size, 3, generator=gen) < torch.sigmoid(logits.float())).float()
    ids = torch.randint(0, 2**40, (groups,), generator=gen)
    return {
        "logits": logits.to(dtype),
        "labels": labels.masked_fill(~mask, math.nan),
        "weights": torch.rand(size, 3, generator=gen) + 0.5,
        "mask": mask,
        "groups": ids[torch.randint(0, groups, (size,), generator=gen)],
    }


def loop_values(parts, rates=RATES, ks=KS):
    """gauc and ndcg@k per task over the batches: each batch's groups by the Python loop, summed."""
    out = {}
    for t, task in enumerate(TASKS):
        sums = {}
        for part in parts:
            one = group_metrics(
                part["logits"].double(),
                part["labels"],
                part["weights"],
                part["mask"],
                part["groups"],
                t,
                ks,
                rates[t],
            )
            for key, value in one.items():
                sums[key] = sums.get(key, 0.0) + value
        out[f"gauc/{task}"] = sums["gauc_sum"] / sums["gauc_weight"] if sums["gauc_weight"] > 0 else math.nan
        for k in ks:
            out[f"ndcg@{k}/{task}"] = sums[f"ndcg_sum@{k}"] / sums["ndcg_groups"] if sums["ndcg_groups"] else math.nan
    return out


def assert_values(results, wanted, abs_=1e-10):
    for key, value in wanted.items():
        assert results[key].item() == pytest.approx(value, abs=abs_, nan_ok=True), key


@pytest.mark.parametrize("ties", [False, True])
def test_gauc_and_ndcg_equal_the_per_group_loop(ties):
    parts = [grouped_batch(size, seed, ties=ties) for size, seed in ((300, 1), (0, 2), (157, 3), (1, 4))]
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, auc_bins=64, ndcg_k=KS)
    for part in parts:
        metric.update(**part)
    results = metric.compute()
    assert_values(results, loop_values(parts))


def test_rows_of_a_group_in_any_order_and_ids_of_any_size():
    part = grouped_batch(200, 5)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(6))
    shuffled = {key: value[order] for key, value in part.items()}
    renamed = {**part, "groups": torch.unique(part["groups"], return_inverse=True)[1] - 7}  # small and negative ids
    results = []
    for batch in (part, shuffled, renamed):
        metric = MultiTaskRankingMetrics(TASKS, auc_bins=32, ndcg_k=KS)
        metric.update(**batch)
        results.append(metric.group_sums.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[2], results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_ids_read_directly_or_ranked_give_the_same_sums(offset):
    """Ids spanning just below, at and above the span the block key takes as they are give one result."""
    part = grouped_batch(200, 7)
    limit = 2 ** (30 - (len(TASKS) - 1).bit_length())  # 63 key bits: 33 for the logit, 2 for 3 tasks
    dense = torch.unique(part["groups"], return_inverse=True)[1]
    spread = torch.where(dense == dense.max(), limit - 1 + offset, dense) - 5  # span limit + offset
    _, span = _grouped.group_ids(spread, limit)
    assert span == (limit + offset if offset <= 0 else 200)  # read directly up to the limit, ranked above
    results = []
    for groups in (part["groups"], spread):
        metric = MultiTaskRankingMetrics(TASKS, auc_bins=32, ndcg_k=KS)
        metric.update(**{**part, "groups": groups})
        results.append(metric.group_sums.clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


def test_a_group_is_one_update():
    """The same id in two updates is two groups."""
    logits = torch.tensor([[2.0], [1.0], [0.0], [-1.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    metric = MultiTaskRankingMetrics(["t"], auc_bins=16, ndcg_k=(2,))
    metric.update(logits[:2], labels[:2], groups=torch.tensor([7, 7]))
    metric.update(logits[2:], labels[2:], groups=torch.tensor([7, 7]))
    results = metric.compute()
    # Group 1: positive above the negative (AUC 1, NDCG 1); group 2: below (AUC 0, NDCG 1/log2(3)).
    assert results["gauc/t"].item() == pytest.approx(0.5)
    assert results["ndcg@2/t"].item() == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert results["auc/t"].item() == pytest.approx(0.5)  # the histograms see all four rows


def test_ndcg_worked_example_with_a_tie_and_k():
    # One group: logits 3, 2, 2, 1, 0 with labels 0, 1, 0, 1, 0; ranks 1..5, the 2s tie on ranks 2-3.
    logits = torch.tensor([[3.0], [2.0], [2.0], [1.0], [0.0]])
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0]])
    metric = MultiTaskRankingMetrics(["t"], ndcg_k=(2, 5))
    metric.update(logits, labels, groups=torch.zeros(5, dtype=torch.int64))
    results = metric.compute()
    d = [1 / math.log2(r + 1) for r in range(1, 6)]
    ideal2, ideal5 = d[0] + d[1], d[0] + d[1]
    assert results["ndcg@2/t"].item() == pytest.approx((d[1] / 2) / ideal2)  # the tie's half of rank 2
    assert results["ndcg@5/t"].item() == pytest.approx(((d[1] + d[2]) / 2 + d[3]) / ideal5)
    assert "gauc/t" not in results  # gauc comes with auc_bins


def test_masked_entries_take_no_rank_and_weights_do_not_enter_ndcg():
    logits = torch.tensor([[5.0], [1.0], [0.0]])
    labels = torch.tensor([[math.nan], [1.0], [0.0]])
    mask = torch.tensor([[False], [True], [True]])
    metric = MultiTaskRankingMetrics(["t"], auc_bins=8, ndcg_k=(1,))
    metric.update(logits, labels, torch.tensor([9.0, 0.5, 3.0]), mask, groups=torch.tensor([1, 1, 1]))
    results = metric.compute()
    assert results["ndcg@1/t"].item() == 1.0
    assert results["gauc/t"].item() == 1.0


def test_groups_with_one_class_and_no_positive_are_left_out_or_nan_with_one_warning():
    metric = MultiTaskRankingMetrics(["a", "b"], auc_bins=16, ndcg_k=(3,), window=100)
    logits = torch.randn(6, 2)
    # a: group 0 has both classes, group 1 positives only; b: group 0 positives only, group 1 negatives only.
    labels = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    metric.update(logits, labels, groups=torch.tensor([0, 0, 0, 1, 1, 1]))
    with pytest.warns(UserWarning, match="undefined metrics returned as NaN") as record:
        results = metric.compute()
    assert len(record) == 1
    message = str(record[0].message)
    assert "gauc needs a group with a positive and a negative, none for ['b']" in message
    assert math.isnan(results["gauc/b"].item())
    assert math.isnan(results["window_gauc/b"].item())
    assert results["ndcg@3/b"].item() == pytest.approx(1.0)  # group 0 alone: all positive, ideal order
    assert not math.isnan(results["gauc/a"].item())  # group 0 alone
    assert not any(math.isinf(value.item()) for value in results.values())


def test_forward_gives_the_batch_values():
    parts = [grouped_batch(120, seed) for seed in (10, 11)]
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, auc_bins=64, ndcg_k=KS, window=1000)
    for part in parts:
        batch = metric(**part)
    assert_values(batch, loop_values(parts[-1:]))
    assert_values({key.removeprefix("window_"): value for key, value in batch.items()}, loop_values(parts[-1:]))
    assert_values(metric.compute(), loop_values(parts))


def test_float32_and_half_logits_are_ordered_in_float32():
    part = grouped_batch(300, 12, dtype=torch.float32)
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=64, ndcg_k=KS)
    metric.update(**{**part, "logits": part["logits"].half()})
    wanted = loop_values([{**part, "logits": part["logits"].half().float()}], rates=[1.0, 1.0, 1.0])
    assert_values(metric.compute(), wanted, abs_=1e-6)


def test_group_errors_name_the_argument():
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=16)
    logits, labels = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(TypeError, match=r"`groups` to hold integer ids .* got dtype torch.float32"):
        metric.update(logits, labels, groups=torch.zeros(4))
    with pytest.raises(ValueError, match=r"`groups` of shape \[B\] \(4,\), one id per row .* got \(4, 1\)"):
        metric.update(logits, labels, groups=torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"`groups` to be a torch.Tensor"):
        metric.update(logits, labels, groups=[0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"`auc_bins` or `ndcg_k` to be set when `groups` is given"):
        MultiTaskRankingMetrics(TASKS).update(logits, labels, groups=torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize(
    ("ks", "error", "match"),
    [
        ((0,), ValueError, r"every entry of `ndcg_k` to be a positive int, got \[0\]"),
        ((5, 5), ValueError, r"`ndcg_k` to be distinct"),
        ((2.5,), ValueError, r"positive int, got \[2.5\]"),
        (10, TypeError, r"`ndcg_k` to be a sequence of positive ints, got int"),
    ],
)
def test_ndcg_k_is_checked_at_construction(ks, error, match):
    with pytest.raises(error, match=match):
        MultiTaskRankingMetrics(TASKS, ndcg_k=ks)


def test_no_groups_given_means_nan_without_warning():
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=16, ndcg_k=(5,))
    part = grouped_batch(200, 13)
    del part["groups"]
    metric.update(**part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = metric.compute()
    assert math.isnan(results["gauc/fav"].item())
    assert math.isnan(results["ndcg@5/fav"].item())


def test_functional_grouped_sums_are_the_metric_states():
    part = grouped_batch(64, 14)
    mask, labels, weights = part["mask"], part["labels"].nan_to_num(0.0), part["weights"].double()
    positive = torch.where(mask, weights * labels, 0.0)
    relevant = (labels >= 0.5) & mask
    sums = grouped_sums(part["logits"], positive, torch.where(mask, weights, 0.0), relevant, mask, part["groups"], (2,))
    assert sums.shape == (len(group_rows((2,))), 3) == (5, 3)
    metric = MultiTaskRankingMetrics(TASKS, ndcg_k=(2,))
    metric.update(**part)
    torch.testing.assert_close(sums, metric.group_sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_per_task_row_sort_equals_the_single_sort(monkeypatch, dtype):
    """Keys too wide for one int64 (many tasks and rows) fall back to sorting each task's row."""
    part = grouped_batch(300, 17, dtype=dtype, ties=True)
    mask, labels, weights = part["mask"], part["labels"].nan_to_num(0.0), part["weights"].to(dtype)
    inputs = (
        part["logits"],
        torch.where(mask, weights * labels, 0.0),
        torch.where(mask, weights, 0.0),
        (labels >= 0.5) & mask,
        mask,
        part["groups"],
        KS,
    )
    single = grouped_sums(*inputs)
    # 3 tasks (2 bits) and 300 rows (9 bits) with the logit's 33 need 44 bits: 43 forces the fallback.
    monkeypatch.setattr(_grouped, "_KEY_BITS", 43)
    rows = grouped_sums(*inputs)
    torch.testing.assert_close(rows, single, rtol=1e-12, atol=1e-12)
    assert single[3].min() > 0  # groups with positives
    assert single[1].min() > 0  # and with both classes


def test_unlabelled_entries_with_the_highest_logits_take_no_rank():
    logits = torch.tensor([[9.0], [8.0], [1.0], [0.0], [-1.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0], [0.0]])
    mask = torch.tensor([[False], [False], [True], [True], [True]])
    metric = MultiTaskRankingMetrics(["t"], auc_bins=16, ndcg_k=(1, 2))
    metric.update(logits, labels, mask=mask, groups=torch.zeros(5, dtype=torch.int64))
    results = metric.compute()
    # Labelled: 1 (neg), 0 (pos), -1 (neg): the positive is ranked 2nd and above one of two negatives.
    assert results["ndcg@1/t"].item() == 0.0
    assert results["ndcg@2/t"].item() == pytest.approx(1 / math.log2(3))
    assert results["gauc/t"].item() == pytest.approx(0.5)


def test_copies_pickles_and_state_dict_keep_every_family():
    import copy
    import pickle

    parts = [grouped_batch(150, seed) for seed in (15, 16)]
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, auc_bins=128, ndcg_k=KS, window=400)
    metric.update(**parts[0])
    resumed = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, auc_bins=128, ndcg_k=KS, window=400)
    resumed.load_state_dict(pickle.loads(pickle.dumps(metric.state_dict())))
    for copied in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric)), resumed):
        copied.update(**parts[1])
        assert_values(copied.compute(), loop_values(parts))
