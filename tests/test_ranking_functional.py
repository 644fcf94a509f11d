"""losses.ranking_functional: the per-task sums and the ratios, against plain float64 loops."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses.ranking_functional import RESULTS, SUM_ROWS, ranking_compute, ranking_sums
from tests.ranking_reference import ancestor_rce, reference_metrics, torchrec_ne

TASKS = ["click", "fav", "reply", "share"]


def block(batch=300, tasks=4, seed=0, dtype=torch.float64, scale=2.0, rates=(0.3, 0.1, 0.05, 0.01)):
    """Random logits, binary labels with per-task positive rates, [B, T] weights and a mask."""
    gen = torch.Generator().manual_seed(seed)
    positive_rates = torch.tensor(rates[:tasks])
    return {
        "logits": (torch.randn(batch, tasks, generator=gen) * scale - 1.0).to(dtype),
        "labels": (torch.rand(batch, tasks, generator=gen) < positive_rates * 3).float(),
        "weights": (torch.rand(batch, tasks, generator=gen) + 0.5).to(dtype),
        "mask": torch.rand(batch, tasks, generator=gen) < 0.8,
    }


def values(results):
    return {key: value.item() for key, value in results.items()}


def assert_metrics_close(actual, expected, rel=1e-10, abs=1e-10):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=rel, abs=abs, nan_ok=True), key


def test_sums_table_and_results_table_agree_with_the_keys():
    assert list(SUM_ROWS) == ["weight", "positive", "prediction", "cross_entropy"]
    assert list(RESULTS) == ["ne", "rce", "logloss", "calibration", "ctr"]
    data = block(tasks=2)
    sums = ranking_sums(**data)
    assert sums.shape == (len(SUM_ROWS), 2)
    assert sums.dtype == torch.float64
    keys = list(ranking_compute(sums, ["a", "b"]))
    assert keys == [f"{name}/{task}" for name in RESULTS for task in ("a", "b")]


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_rates", [False, True])
@pytest.mark.parametrize("weights_shape", ["BT", "B", None])
def test_matches_the_float64_reference(with_mask, with_rates, weights_shape):
    data = block(seed=3)
    weights = {"BT": data["weights"], "B": data["weights"][:, 0], None: None}[weights_shape]
    mask = data["mask"] if with_mask else None
    rates = [0.5, 0.2, 1.0, 0.05] if with_rates else None
    sums = ranking_sums(
        data["logits"],
        data["labels"],
        weights,
        mask,
        None if rates is None else torch.tensor(rates, dtype=torch.float64),
    )
    expected = reference_metrics(TASKS, data["logits"], data["labels"], weights, mask, rates)
    assert_metrics_close(values(ranking_compute(sums, TASKS)), expected)


def test_float32_and_half_inputs_are_summed_into_float64():
    data = block(batch=5000, seed=4)
    expected = reference_metrics(TASKS, data["logits"], data["labels"], data["weights"], data["mask"])
    for dtype, rel in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        sums = ranking_sums(data["logits"].to(dtype), data["labels"], data["weights"].to(dtype), data["mask"])
        assert sums.dtype == torch.float64
        # bfloat16/float16 round the inputs themselves; the reference sees the rounded values.
        rounded = reference_metrics(
            TASKS, data["logits"].to(dtype).double(), data["labels"], data["weights"].to(dtype).double(), data["mask"]
        )
        assert_metrics_close(values(ranking_compute(sums, TASKS)), rounded, rel=rel, abs=rel)
        if dtype == torch.float32:
            assert_metrics_close(values(ranking_compute(sums, TASKS)), expected, rel=rel, abs=rel)


@pytest.mark.parametrize("batch", [255, 256, 257, 8191, 70_000])
def test_row_group_boundaries(batch):
    """Groups of 256 rows are summed in float32, then in float64: every row counts once."""
    data = block(batch=batch, seed=batch, dtype=torch.float32)
    sums = ranking_sums(**data)
    expected = ranking_sums(**{key: value.double() if key != "mask" else value for key, value in data.items()})
    torch.testing.assert_close(sums, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "label_dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
)
def test_label_dtypes(label_dtype):
    data = block(seed=5)
    expected = ranking_sums(**data)
    labels = data["labels"].to(label_dtype)
    torch.testing.assert_close(ranking_sums(data["logits"], labels, data["weights"], data["mask"]), expected)


def test_weights_of_shape_b_equal_the_same_weight_on_every_task():
    data = block(seed=6)
    row_weights = data["weights"][:, 0]
    torch.testing.assert_close(
        ranking_sums(data["logits"], data["labels"], row_weights, data["mask"]),
        ranking_sums(data["logits"], data["labels"], row_weights[:, None].expand(-1, 4).clone(), data["mask"]),
    )


def test_unlabelled_entries_add_nothing_whatever_they_hold():
    data = block(seed=7)
    mask = data["mask"]
    poisoned = {
        "logits": data["logits"].masked_fill(~mask, math.nan),
        "labels": data["labels"].masked_fill(~mask, math.nan),
        "weights": data["weights"].masked_fill(~mask, math.inf),
    }
    sums = ranking_sums(poisoned["logits"], poisoned["labels"], poisoned["weights"], mask)
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums, ranking_sums(**data), rtol=0, atol=0)
    # Also with float32 inputs and with sampling rates (other code paths).
    rates = torch.tensor([0.5, 0.5, 0.25, 1.0])
    float32 = {key: value.float() for key, value in poisoned.items()}
    sums32 = ranking_sums(float32["logits"], float32["labels"], float32["weights"], mask, rates)
    assert torch.isfinite(sums32).all()


def test_huge_logits_give_finite_exact_cross_entropy_without_clipping():
    logits = torch.tensor([[60.0], [-60.0], [1e4], [-1e4], [30.0]])
    labels = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0]])
    sums = ranking_sums(logits, labels)
    rows = dict(zip(SUM_ROWS, sums[:, 0].tolist(), strict=True))
    # Wrong and confident: the loss is the logit's size (a clipped probability would cap it at ~16).
    # Right and confident: log(1 + e^-|x|), about 0.
    assert rows["cross_entropy"] == pytest.approx(60.0 + 60.0 + 0.0 + 0.0 + math.log1p(math.exp(-30.0)), rel=1e-6)
    assert rows["prediction"] == pytest.approx(1.0 + 0.0 + 1.0 + 0.0 + 1.0)


def test_cross_entropy_of_negatives_with_very_negative_logits_keeps_its_precision():
    """softplus(x) for x << 0 is tiny; it is computed directly, not as a difference of large numbers."""
    logits = torch.full((1000, 1), -12.0)
    sums = ranking_sums(logits, torch.zeros(1000, 1))
    assert sums[3, 0].item() == pytest.approx(1000 * math.log1p(math.exp(-12.0)), rel=1e-6)


def test_sampling_rates_count_negatives_one_over_rate():
    logits = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0], [0.0], [0.0]])
    # Down-sampled at 1/4: the same as the full traffic with each negative repeated 4 times.
    full_logits = torch.cat([logits[:1], logits[1:].repeat(4, 1)])
    full_labels = torch.cat([labels[:1], labels[1:].repeat(4, 1)])
    torch.testing.assert_close(
        ranking_sums(logits, labels, neg_sampling_rates=torch.tensor([0.25])), ranking_sums(full_logits, full_labels)
    )


def test_soft_labels_split_into_a_positive_and_a_negative_part():
    logits = torch.tensor([[0.5]], dtype=torch.float64)
    soft = ranking_sums(logits, torch.tensor([[0.25]]), neg_sampling_rates=torch.tensor([0.5]))
    # One quarter of a positive and three quarters of a negative kept at rate 1/2.
    parts = ranking_sums(
        logits.repeat(2, 1),
        torch.tensor([[1.0], [0.0]]),
        torch.tensor([0.25, 0.75], dtype=torch.float64),
        neg_sampling_rates=torch.tensor([0.5]),
    )
    torch.testing.assert_close(soft, parts)


def test_agrees_with_torchrec_ne_and_the_ancestor_rce_where_clipping_does_not_bite():
    gen = torch.Generator().manual_seed(8)
    logits = (torch.rand(4000, 3, generator=gen) * 6 - 3).double()  # probabilities in [0.047, 0.953]
    labels = (torch.rand(4000, 3, generator=gen) < torch.sigmoid(logits)).double()
    weights = torch.rand(4000, 3, generator=gen).double() + 0.5
    results = values(ranking_compute(ranking_sums(logits, labels, weights), ["a", "b", "c"]))
    ours_ne = [results[f"ne/{task}"] for task in "abc"]
    ours_rce = [results[f"rce/{task}"] for task in "abc"]
    assert ours_ne == pytest.approx(torchrec_ne(logits, labels, weights), rel=1e-12)
    assert ours_rce == pytest.approx(ancestor_rce(logits, labels, weights), abs=1e-3)
    assert ours_rce == pytest.approx([100 * (1 - ne) for ne in ours_ne], rel=1e-12)


def test_undefined_ratios_are_nan_with_one_warning_naming_the_tasks():
    logits = torch.zeros(4, 4, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]])
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 3] = False
    sums = ranking_sums(logits, labels, mask=mask)
    with pytest.warns(UserWarning, match="returned as NaN") as record:
        results = values(ranking_compute(sums, ["ok", "none", "all", "empty"]))
    assert len(record) == 1
    message = str(record[0].message)
    assert "no labelled weight for ['empty']" in message
    assert "labels all of one class for ['none', 'all']" in message
    assert results["ne/ok"] == pytest.approx(math.log(2) / math.log(2))
    for key in ("ne/none", "rce/none", "calibration/none", "ne/all", "rce/all"):
        assert math.isnan(results[key]), key
    assert results["ctr/none"] == 0.0
    assert results["ctr/all"] == 1.0
    assert results["calibration/all"] == 0.5
    assert results["logloss/all"] == pytest.approx(math.log(2))
    assert all(math.isnan(results[f"{name}/empty"]) for name in RESULTS)
    assert not any(math.isinf(value) for value in results.values())


def test_no_warning_when_everything_is_defined():
    data = block(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranking_compute(ranking_sums(**data), TASKS)


def test_warn_false_and_prefix():
    sums = torch.zeros(len(SUM_ROWS), 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = ranking_compute(sums, ["t"], prefix="window_", warn=False)
    assert list(results) == [f"window_{name}/t" for name in RESULTS]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"logits": torch.zeros(3)}, r"`logits` of shape \[B, T\], got \(3,\)"),
        ({"labels": torch.zeros(3, 3)}, r"`labels` to have the shape of `logits` \(3, 2\), got \(3, 3\)"),
        ({"weights": torch.ones(2)}, r"`weights` of shape \[B, T\] \(3, 2\) or \[B\] \(3,\), got \(2,\)"),
        ({"mask": torch.ones(3, 2)}, r"`mask` to be a bool tensor"),
        ({"neg_sampling_rates": torch.ones(3)}, r"`neg_sampling_rates` of shape \(2,\), one rate per task, got \(3,\)"),
        ({"logits": torch.zeros(3, 2, dtype=torch.long)}, r"`logits` to be a floating point tensor"),
    ],
)
def test_shape_errors_name_the_argument(change, match):
    inputs = {"logits": torch.zeros(3, 2), "labels": torch.zeros(3, 2), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        ranking_sums(**inputs)


def test_compute_rejects_sums_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"`sums` of shape \(4, 2\) \(sum rows, tasks\), got \(4, 3\)"):
        ranking_compute(torch.zeros(4, 3, dtype=torch.float64), ["a", "b"])


def test_inputs_requiring_grad_are_fine_and_nothing_is_differentiated():
    data = block(seed=10)
    logits = data["logits"].clone().requires_grad_()
    weights = data["weights"].clone().requires_grad_()
    sums = ranking_sums(logits, data["labels"], weights, data["mask"])
    assert not sums.requires_grad


@settings(max_examples=40, deadline=None)
@given(split=st.integers(0, 300), seed=st.integers(0, 2**16), rates=st.booleans())
def test_sums_are_additive_over_any_split_of_the_rows(split, seed, rates):
    data = block(seed=seed)
    kwargs = {"neg_sampling_rates": torch.tensor([0.5, 0.1, 1.0, 0.3])} if rates else {}
    whole = ranking_sums(**data, **kwargs)
    head = ranking_sums(**{key: value[:split] for key, value in data.items()}, **kwargs)
    tail = ranking_sums(**{key: value[split:] for key, value in data.items()}, **kwargs)
    torch.testing.assert_close(head + tail, whole, rtol=1e-12, atol=1e-12)
