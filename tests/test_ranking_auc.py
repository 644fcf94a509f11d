"""AUC and PR-AUC of MultiTaskRankingMetrics (auc_bins): values against exact sorting references."""

import math
import warnings

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from losses import MultiTaskRankingMetrics
from losses._auc import AucBins, auc_error_bound, auc_values
from tests.ranking_reference import auc_inputs, exact_auc, exact_average_precision

TASKS = ["click", "fav"]
RATES = [1.0, 0.25]


def ctr_batch(size, seed, tasks=2, dtype=torch.float32):
    """Logits around -4 with spread 2, labels drawn from a noisy version of them, weights, a mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, tasks, generator=gen) * 2 - 4
    truth = logits + torch.randn(size, tasks, generator=gen)
    labels = (torch.rand(size, tasks, generator=gen) < torch.sigmoid(truth)).float()
    mask = torch.rand(size, tasks, generator=gen) < 0.9
    return {
        "logits": logits.to(dtype),
        "labels": labels.masked_fill(~mask, math.nan),
        "weights": torch.rand(size, tasks, generator=gen) + 0.5,
        "mask": mask,
    }


def joined(parts):
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def test_issue_accuracy_200k_samples_three_updates_4096_bins():
    """The issue's target: |auc - exact| <= 1e-4 and |pr_auc - average_precision_score| <= 1e-3."""
    parts = [ctr_batch(size, seed) for size, seed in ((70_000, 1), (60_000, 2), (70_000, 3))]
    metric = MultiTaskRankingMetrics(TASKS, neg_sampling_rates=RATES, auc_bins=4096)
    for part in parts:
        metric.update(**part)
    results = metric.compute()
    data = joined(parts)
    bounds = auc_error_bound(metric.auc_histograms)
    for t, task in enumerate(TASKS):
        x, positive, mass = auc_inputs(data["logits"], data["labels"], data["weights"], data["mask"], t, RATES[t])
        assert positive.sum() > 1000
        assert (~positive).sum() > 100_000
        exact = roc_auc_score(positive.numpy(), x.numpy(), sample_weight=mass.numpy())
        assert exact == pytest.approx(exact_auc(x, positive, mass), abs=1e-12)  # two references agree
        error = abs(results[f"auc/{task}"].item() - exact)
        assert error <= 1e-4
        assert error <= bounds[t].item() <= 5e-4  # the documented bound holds, and is not vacuous
        ap = average_precision_score(positive.numpy(), x.numpy(), sample_weight=mass.numpy())
        assert ap == pytest.approx(exact_average_precision(x, positive, mass), abs=1e-9)
        assert results[f"pr_auc/{task}"].item() == pytest.approx(ap, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_few_distinct_logits_are_exact_with_ties_half(dtype):
    """Logits on the bin centres: every tie is inside one bin, and the binned AUC is the exact one."""
    gen = torch.Generator().manual_seed(5)
    bins = AucBins(49, 3)
    centres = bins.centres()
    logits = centres[torch.randint(0, 49, (500, 3), generator=gen)].to(dtype)
    labels = (torch.rand(500, 3, generator=gen) < 0.3).float()
    weights = torch.rand(500, generator=gen, dtype=torch.float64) + 0.1
    metric = MultiTaskRankingMetrics(["a", "b", "c"], auc_bins=49, neg_sampling_rates=[0.5, 1.0, 0.1])
    metric.update(logits, labels, weights)
    results = metric.compute()
    # A float32 block's masses are summed in float32 before the float64 states.
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for t, (task, rate) in enumerate(zip("abc", [0.5, 1.0, 0.1], strict=True)):
        x, positive, mass = auc_inputs(logits, labels, weights, None, t, rate)
        assert results[f"auc/{task}"].item() == pytest.approx(exact_auc(x, positive, mass), abs=tolerance)
        ap = exact_average_precision(x, positive, mass)
        assert results[f"pr_auc/{task}"].item() == pytest.approx(ap, abs=tolerance)


def test_bin_rule_centres_and_catch_all_ends():
    bins = AucBins(17, 1)  # width 1: centres -12, -11, ..., 4
    torch.testing.assert_close(bins.centres(), torch.arange(-12.0, 5.0, dtype=torch.float64))
    logits = torch.tensor(
        [[-1e9], [-12.6], [-12.4], [-11.6], [-4.2], [-3.8], [3.6], [4.4], [40.0], [math.inf], [math.nan]]
    )
    weight = torch.arange(1.0, 12.0).unsqueeze(1)
    positive = torch.zeros(11, 1, dtype=torch.bool)
    histogram = bins.histograms(logits, positive, weight)[0, 0]
    wanted = torch.zeros(17, dtype=torch.float64)
    # bin 0 takes -inf..-11.5 and NaN; bin 16 takes 3.5 and above
    for value, bin_ in zip(range(1, 12), [0, 0, 0, 0, 8, 8, 16, 16, 16, 16, 0], strict=True):
        wanted[bin_] += value
    torch.testing.assert_close(histogram, wanted)


def test_error_bound_is_half_the_pairs_sharing_a_bin():
    histograms = torch.zeros(2, 1, 4, dtype=torch.float64)
    histograms[1, 0] = torch.tensor([0.0, 2.0, 1.0, 3.0])  # positives
    histograms[0, 0] = torch.tensor([4.0, 1.0, 0.0, 2.0])  # negatives
    # pairs: 6 * 7 = 42; sharing a bin: 2 * 1 + 3 * 2 = 8; bound 4 / 42
    assert auc_error_bound(histograms).item() == pytest.approx(4 / 42)
    # auc: positives above negatives: 2*(4 + 0.5) + 1*(5) + 3*(5 + 1) = 9 + 5 + 18 = 32 over 42
    assert auc_values(histograms)[0].item() == pytest.approx(32 / 42)


def test_one_class_tasks_are_nan_with_the_single_warning_never_inf():
    metric = MultiTaskRankingMetrics(["a", "b", "c"], auc_bins=64, window=100)
    logits = torch.randn(10, 3)
    labels = torch.tensor([[1.0, 0.0, 1.0]] * 10)
    labels[:5, 0] = 0.0
    mask = torch.ones(10, 3, dtype=torch.bool)
    mask[:, 2] = False
    metric.update(logits, labels, mask=mask)
    with pytest.warns(UserWarning, match="undefined metrics returned as NaN") as record:
        results = metric.compute()
    assert len(record) == 1
    assert "AUC and PR-AUC need positives and negatives, missing for ['b', 'c']" in str(record[0].message)
    assert not math.isnan(results["auc/a"].item())
    for key in ("auc/b", "pr_auc/b", "auc/c", "pr_auc/c", "window_auc/b", "window_pr_auc/c"):
        assert math.isnan(results[key].item()), key
    assert not any(math.isinf(value.item()) for value in results.values())


def test_empty_updates_add_nothing_and_window_keys_follow_the_ring():
    parts = [ctr_batch(size, seed) for size, seed in ((0, 10), (400, 11), (0, 12), (300, 13), (500, 14))]
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=512, window=700)  # slots of 70 rows: one update each
    for part in parts:
        metric.update(**part)
    alone = MultiTaskRankingMetrics(TASKS, auc_bins=512)
    for part in parts[1:]:
        alone.update(**part)
    results, wanted = metric.compute(), alone.compute()
    for key, value in wanted.items():
        torch.testing.assert_close(results[key], value, equal_nan=True)
        torch.testing.assert_close(results["window_" + key], value, equal_nan=True)
    torch.testing.assert_close(metric.auc_histograms, alone.auc_histograms, rtol=0, atol=0)


def test_window_auc_forgets_old_slots():
    parts = [ctr_batch(200, seed) for seed in range(20, 34)]
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=256, window=1000)  # slots of 100 rows: one update each
    for part in parts:
        metric.update(**part)
    last = MultiTaskRankingMetrics(TASKS, auc_bins=256)
    for part in parts[-10:]:
        last.update(**part)
    results, wanted = metric.compute(), last.compute()
    for task in TASKS:
        for name in ("auc", "pr_auc"):
            assert results[f"window_{name}/{task}"].item() == pytest.approx(wanted[f"{name}/{task}"].item(), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_binned_in_float32(dtype):
    part = ctr_batch(3000, 40)
    half = part["logits"].to(dtype)
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=1024)
    metric.update(**{**part, "logits": half})
    reference = MultiTaskRankingMetrics(TASKS, auc_bins=1024)
    reference.update(**{**part, "logits": half.float()})
    torch.testing.assert_close(metric.auc_histograms, reference.auc_histograms, rtol=0, atol=0)
    results = metric.compute()
    for t, task in enumerate(TASKS):
        x, positive, mass = auc_inputs(half.float(), part["labels"], part["weights"], part["mask"], t)
        assert results[f"auc/{task}"].item() == pytest.approx(
            exact_auc(x, positive, mass), abs=auc_error_bound(metric.auc_histograms)[t].item() + 1e-12
        )


def test_probability_labels_count_as_a_positive_and_a_negative_like_ne():
    """A label y of weight w is a positive of weight w y and a negative of weight w (1 - y) / r, tied."""
    gen = torch.Generator().manual_seed(41)
    logits = (torch.randn(300, 1, generator=gen, dtype=torch.float64) * 4).round() / 4  # ties too
    soft = torch.rand(300, 1, generator=gen, dtype=torch.float64)
    weights = torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    metric = MultiTaskRankingMetrics(["t"], auc_bins=4097, neg_sampling_rates=[0.5])  # centres every 1/256
    metric.update(logits, soft, weights)
    # The exact AUC of the samples split in two: every entry once as a positive, once as a negative.
    x = torch.cat([logits[:, 0], logits[:, 0]])
    positive = torch.cat([torch.ones(300, dtype=torch.bool), torch.zeros(300, dtype=torch.bool)])
    mass = torch.cat([weights * soft[:, 0], weights * (1 - soft[:, 0]) / 0.5])
    results = metric.compute()
    assert results["auc/t"].item() == pytest.approx(exact_auc(x, positive, mass), abs=1e-12)
    assert results["pr_auc/t"].item() == pytest.approx(exact_average_precision(x, positive, mass), abs=1e-12)


def test_one_dimensional_weights_and_bool_labels():
    part = ctr_batch(2000, 50)
    weights = torch.rand(2000, generator=torch.Generator().manual_seed(51)) + 0.5
    labels = part["labels"].nan_to_num(0.0) > 0.5
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=2048, neg_sampling_rates=RATES)
    metric.update(part["logits"], labels, weights, part["mask"])
    results = metric.compute()
    for t, task in enumerate(TASKS):
        x, positive, mass = auc_inputs(part["logits"], labels.float(), weights, part["mask"], t, RATES[t])
        bound = auc_error_bound(metric.auc_histograms)[t].item()
        assert abs(results[f"auc/{task}"].item() - exact_auc(x, positive, mass)) <= bound


@pytest.mark.parametrize("bins", [0, 1, -3, 2.5, True, "64"])
def test_auc_bins_is_checked_at_construction(bins):
    with pytest.raises(ValueError, match=rf"`auc_bins` to be None or an int >= 2, got {bins!r}"):
        MultiTaskRankingMetrics(TASKS, auc_bins=bins)


def test_two_bins_split_at_minus_four():
    metric = MultiTaskRankingMetrics(["t"], auc_bins=2)
    metric.update(torch.tensor([[-5.0], [-3.0], [-4.5], [9.0]]), torch.tensor([[0], [1], [1], [0]]))
    # bins: below -4 {neg, pos}, above {pos, neg}: every pair ties: 0.5
    assert metric.compute()["auc/t"].item() == pytest.approx(0.5)


def test_keys_state_and_no_warning_when_defined():
    metric = MultiTaskRankingMetrics(TASKS, auc_bins=4096, window=1000)
    assert [key for key in metric if key.endswith("/fav")] == [
        f"{prefix}{name}/fav"
        for prefix in ("", "window_")
        for name in ("ne", "rce", "logloss", "calibration", "ctr", "auc", "pr_auc", "gauc")
    ]
    assert metric.auc_histograms.shape == (2, 2, 4096)
    assert metric.window_auc_histograms.shape == (10, 2, 2, 4096)
    metric.update(**ctr_batch(5000, 60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = metric.compute()
    assert math.isnan(values["gauc/fav"].item())  # no update passed groups: NaN, no warning
    assert repr(metric).endswith("auc_bins=4096)")
