"""Adversarial cases for the ranking metrics' fast paths (issue 17): the one packed sort, the two-half histograms.

The yardsticks here are written for this file: a float64 Python loop over groups and over every
(positive, negative) pair of masses, which takes probability labels (an entry is a positive of
mass ``w y`` and a negative of mass ``w (1 - y) / r``), and a loop putting each logit into its bin
by the documented rule; scikit-learn for the AUC and average precision of logits one per bin.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from losses import MultiTaskRankingMetrics, _grouped
from losses._auc import DENSE_RANGE

TASKS = 3


def loop_group_values(logits, labels, weights, mask, groups, ks, rates=None):
    """``{name: [per task]}`` gauc and ndcg@k by loops over tasks, groups and pairs (logits compared in float32)."""
    batch, tasks = logits.shape
    x = logits.to(torch.float32).double()
    out = {"gauc": [], **{f"ndcg@{k}": [] for k in ks}}
    for t in range(tasks):
        rate = 1.0 if rates is None else rates[t]
        auc_sum = auc_weight = 0.0
        ndcg = dict.fromkeys(ks, 0.0)
        ranked = 0
        for gid in sorted(set(groups.tolist())):
            rows = [i for i in range(batch) if groups[i] == gid and (mask is None or mask[i, t])]
            p = {i: weights[i, t].item() * labels[i, t].item() for i in rows}
            q = {i: weights[i, t].item() * (1 - labels[i, t].item()) / rate for i in rows}
            big_p, big_q = sum(p.values()), sum(q.values())
            if big_p > 0 and big_q > 0:
                pairs = sum(
                    p[i] * q[j] * (1.0 if x[i, t] > x[j, t] else 0.5 if x[i, t] == x[j, t] else 0.0)
                    for i in rows
                    for j in rows
                )
                auc_sum += (big_p + big_q) * pairs / (big_p * big_q)
                auc_weight += big_p + big_q
            relevant = [i for i in rows if labels[i, t].item() >= 0.5]
            if relevant:
                ranked += 1
                for k in ks:
                    discount = [1 / math.log2(r + 2) if r < k else 0.0 for r in range(len(rows))]
                    dcg = 0.0
                    for i in relevant:
                        above = sum(1 for j in rows if x[j, t] > x[i, t])
                        tied = sum(1 for j in rows if x[j, t] == x[i, t])
                        dcg += sum(discount[above : above + tied]) / tied
                    ndcg[k] += dcg / sum(discount[: len(relevant)])
        out["gauc"].append(auc_sum / auc_weight if auc_weight > 0 else math.nan)
        for k in ks:
            out[f"ndcg@{k}"].append(ndcg[k] / ranked if ranked else math.nan)
    return out


def loop_auc(logits, labels, weights, bins):
    """``(auc, pr_auc)`` per task from histograms filled by the documented bin rule, one entry at a time."""
    low, high = DENSE_RANGE
    width = (high - low) / (bins - 1)
    result = []
    for t in range(logits.shape[1]):
        pos, neg = [0.0] * bins, [0.0] * bins
        for i in range(logits.shape[0]):
            value = logits[i, t].item()
            value = low if math.isnan(value) else min(max(value, low), high)
            b = math.floor((value - low) / width + 0.5)
            pos[b] += weights[i, t].item() * labels[i, t].item()
            neg[b] += weights[i, t].item() * (1 - labels[i, t].item())
        total_p, total_q = sum(pos), sum(neg)
        below = auc = ap = 0.0
        for b in range(bins):
            auc += pos[b] * (below + neg[b] / 2)
            below += neg[b]
            above_p, above_q = sum(pos[b:]), sum(neg[b:])
            ap += pos[b] / total_p * above_p / (above_p + above_q) if above_p + above_q > 0 else 0.0
        result.append((auc / (total_p * total_q), ap))
    return result


def _batch(batch, tasks=TASKS, seed=0, groups=5, probabilities=False, ties=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tasks, generator=gen, dtype=torch.float64) * 2
    if ties:
        logits = logits.round()
    labels = torch.rand(batch, tasks, generator=gen, dtype=torch.float64)
    if not probabilities:
        labels = (labels < 0.4).double()
    weights = torch.rand(batch, tasks, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.rand(batch, tasks, generator=gen) < 0.85
    ids = torch.randint(0, groups, (batch,), generator=gen)
    return logits, labels, weights, mask, ids


def _compute(logits, labels, weights, mask, groups, ks=(1, 3), bins=64, names=None, rates=None):
    names = names or [f"t{t}" for t in range(logits.shape[1])]
    metric = MultiTaskRankingMetrics(names, auc_bins=bins, ndcg_k=ks, neg_sampling_rates=rates)
    metric.update(logits, labels, weights, mask, groups)
    return names, metric.compute()


def _assert_grouped(results, names, wanted, abs_=1e-10):
    for key, values in wanted.items():
        for name, value in zip(names, values, strict=True):
            assert results[f"{key}/{name}"].item() == pytest.approx(value, abs=abs_, nan_ok=True), f"{key}/{name}"


@pytest.mark.parametrize(
    ("batch", "tasks", "probabilities", "ties"),
    [(1, 1, False, False), (7, 1, True, True), (13, 3, True, False), (31, 3, False, True), (9, 40, False, True)],
)
def test_gauc_and_ndcg_equal_the_pair_loop(batch, tasks, probabilities, ties):
    """Odd batches (halves of unequal size), one row, one task, 40 tasks, probability labels, tied logits."""
    logits, labels, weights, mask, ids = _batch(batch, tasks, seed=batch, probabilities=probabilities, ties=ties)
    wanted = loop_group_values(logits, labels, weights, mask, ids, (1, 3, 50))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names, results = _compute(logits, labels, weights, mask, ids, ks=(1, 3, 50))
    _assert_grouped(results, names, wanted)
    # The single warning comes exactly when some value is undefined (NaN).
    undefined = any(math.isnan(value) for values in wanted.values() for value in values)
    assert [str(w.message).count("returned as NaN") for w in caught] == ([1] if undefined else [])
    if batch > 1:
        assert any(not math.isnan(v) for v in wanted["gauc"])


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([-(2**63), 2**63 - 1, -1, 0, 2**62]),
        torch.tensor([-5, 70000, -5, 3, 3], dtype=torch.int32),
        torch.tensor([-300, 300, 0, -300, 300], dtype=torch.int16),
        torch.tensor([255, 0, 255, 1, 0], dtype=torch.uint8),
    ],
)
def test_group_ids_of_any_dtype_and_value(ids):
    base = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 2, 4, 1, 3])
    groups = ids[base]
    logits, labels, weights, mask, _ = _batch(len(base), seed=3, ties=True)
    names, results = _compute(logits, labels, weights, mask, groups)
    _assert_grouped(results, names, loop_group_values(logits, labels, weights, mask, groups, (1, 3)))


def test_every_row_its_own_group_has_no_gauc_and_ndcg_one():
    logits, labels, weights, _, _ = _batch(12, seed=4)
    labels[0] = 1.0
    with pytest.warns(UserWarning, match="gauc needs a group with a positive and a negative"):
        names, results = _compute(logits, labels, weights, None, torch.arange(12) * 1000 - 6000)
    for name in names:
        assert math.isnan(results[f"gauc/{name}"].item())
        assert results[f"ndcg@1/{name}"].item() == 1.0


def test_a_mask_that_empties_a_task_gives_nan_for_it_alone():
    logits, labels, weights, mask, ids = _batch(16, seed=5)
    mask[:, 1] = False
    labels[:, 1] = math.nan
    with pytest.warns(UserWarning, match="t1"):
        names, results = _compute(logits, labels, weights, mask, ids)
    wanted = loop_group_values(logits, labels.nan_to_num(0.0), weights, mask, ids, (1, 3))
    for key in ("auc", "pr_auc", "gauc", "ndcg@1"):
        assert math.isnan(results[f"{key}/t1"].item()), key
    _assert_grouped(results, names, wanted)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float64_and_half_logits_are_ordered_in_float32(dtype):
    logits, labels, weights, mask, ids = _batch(21, seed=6, probabilities=True)
    logits = logits.to(dtype)
    names, results = _compute(logits, labels, weights, mask, ids)
    wanted = loop_group_values(logits.double(), labels, weights, mask, ids, (1, 3))
    # Masses are float32 with float32 (half) logits: gauc to float32's precision, NDCG exact.
    _assert_grouped(results, names, wanted, abs_=1e-10 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_infinite_logits_rank_first_and_last(value):
    logits, labels, weights, mask, ids = _batch(14, seed=7, ties=True)
    logits[::3, 0] = value
    names, results = _compute(logits, labels, weights, mask, ids)
    _assert_grouped(results, names, loop_group_values(logits, labels, weights, mask, ids, (1, 3)))


def test_the_per_task_row_sort_with_wide_ids_probability_labels_and_an_odd_batch(monkeypatch):
    """The fallback of keys over 63 bits (forced) gives the same sums as the single sort, and the loop."""
    logits, labels, weights, mask, _ = _batch(17, seed=8, probabilities=True, ties=True)
    ids = torch.tensor([2**62, -(2**62), 7])[torch.arange(17) % 3]
    names, single = _compute(logits, labels, weights, mask, ids)
    monkeypatch.setattr(_grouped, "_KEY_BITS", 33 + 2 + 4)  # 2 task bits, 5 row bits: one short
    _, fallback = _compute(logits, labels, weights, mask, ids)
    for key, value in single.items():
        assert fallback[key].item() == pytest.approx(value.item(), abs=1e-12, nan_ok=True), key
    _assert_grouped(single, names, loop_group_values(logits, labels, weights, mask, ids, (1, 3)))


@pytest.mark.parametrize(("batch", "tasks"), [(1, 1), (2, 1), (7, 2), (15, 5)])
def test_auc_histograms_of_odd_and_tiny_batches_are_the_bin_loop(batch, tasks):
    """Odd batches put their last row into the first half's histogram; nothing is lost or counted twice."""
    logits, labels, weights, _, _ = _batch(batch, tasks, seed=batch + 10, probabilities=True)
    logits[0] = torch.tensor([math.nan, 99.0, -99.0, 4.0, -12.0])[:tasks]
    bins = 33
    names, results = _compute(logits, labels, weights, None, None, ks=(), bins=bins)
    for name, (auc, pr_auc) in zip(names, loop_auc(logits, labels, weights, bins), strict=True):
        assert results[f"auc/{name}"].item() == pytest.approx(auc, abs=1e-12)
        assert results[f"pr_auc/{name}"].item() == pytest.approx(pr_auc, abs=1e-12)


def test_auc_and_pr_auc_of_logits_one_per_bin_are_scikit_learn():
    bins = 17  # centres -12, -11, ..., 4
    gen = torch.Generator().manual_seed(12)
    centres = torch.arange(-12.0, 5.0, dtype=torch.float64)
    logits = torch.stack([centres[torch.randperm(17, generator=gen)] for _ in range(2)], 1)[:15]
    labels = (torch.rand(15, 2, generator=gen) < 0.5).double()
    labels[0], labels[1] = 1.0, 0.0
    weights = torch.rand(15, 2, generator=gen, dtype=torch.float64) + 0.5
    names, results = _compute(logits, labels, weights, None, None, ks=(), bins=bins)
    for t, name in enumerate(names):
        args = (labels[:, t].numpy(), logits[:, t].numpy())
        assert results[f"auc/{name}"].item() == pytest.approx(roc_auc_score(*args, sample_weight=weights[:, t]))
        precision = average_precision_score(*args, sample_weight=weights[:, t].numpy())
        assert results[f"pr_auc/{name}"].item() == pytest.approx(precision)


def test_a_nan_logit_ranks_last_whatever_its_sign_bit():
    """NaN from inf - inf has its sign bit set on x86: its negation's bits then ranked it first.

    The same row ranked first (gauc 0.5, NDCG@1 1) or last (0, 0) by the NaN's sign; it now ties
    with -inf, as the AUC histograms put every NaN in the lowest bin.
    """
    literal = torch.tensor(math.nan)
    computed = -literal  # the sign bit set, as inf - inf leaves it on x86
    assert computed.float().view(torch.int32).item() < 0 < literal.float().view(torch.int32).item()
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    for nan in (literal, computed):
        logits = torch.tensor([[nan.item()], [1.0], [2.0], [0.5]])
        logits[0, 0] = nan
        names, results = _compute(logits, labels, torch.ones(4, 1), None, torch.zeros(4, dtype=torch.int64), ks=(1,))
        minus_inf = logits.nan_to_num(nan=-math.inf)
        _assert_grouped(
            results, names, loop_group_values(minus_inf, labels, torch.ones(4, 1), None, torch.zeros(4), (1,))
        )
        assert results["gauc/t0"].item() == 0.0
        assert results["auc/t0"].item() == 0.0
        # Tied with -inf: a NaN positive against a -inf negative is half a correctly ordered pair.
        pair = torch.tensor([[nan.item()], [-math.inf]])
        _, tied = _compute(pair, labels[:2], torch.ones(2, 1), None, torch.zeros(2, dtype=torch.int64), ks=(1,))
        assert tied["gauc/t0"].item() == 0.5


@pytest.mark.parametrize("label_dtype", [torch.float64, torch.bool, torch.int64])
def test_row_weights_rates_label_dtypes_and_a_transposed_logits_view(label_dtype):
    """Weights ``[B]`` broadcast over tasks, negative sampling rates, bool/int labels, an empty update first."""
    logits, labels, weights, mask, ids = _batch(11, seed=3, ties=True)
    rates = [1.0, 0.5, 0.25]
    row_weights = weights[:, 0].contiguous()
    metric = MultiTaskRankingMetrics(["a", "b", "c"], auc_bins=32, ndcg_k=(2,), neg_sampling_rates=rates)
    metric.update(logits, labels.to(label_dtype), row_weights, torch.zeros_like(mask), ids)  # adds nothing
    metric.update(logits.t().contiguous().t(), labels.to(label_dtype), row_weights, mask, ids.to(torch.int32))
    with pytest.warns(UserWarning, match="gauc"):
        results = metric.compute()
    expanded = row_weights.unsqueeze(1).expand(-1, 3)
    wanted = loop_group_values(logits, labels, expanded, mask, ids, (2,), rates=rates)
    _assert_grouped(results, ["a", "b", "c"], wanted)
    assert not math.isnan(wanted["gauc"][0])
