"""Opt-in value checks (check_inputs=True): they read tensor values, so they are off by default."""

import pytest
import torch

from losses import BCEWithLogitsLoss, CrossEntropyLoss, MultiTaskLoss


class TestBCE:
    def test_off_by_default(self):
        out = BCEWithLogitsLoss()(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))
        assert torch.isfinite(out)

    def test_labels_outside_unit_interval(self):
        loss = BCEWithLogitsLoss(check_inputs=True)
        with pytest.raises(ValueError, match=r"`labels` to be finite in \[0, 1\], got 1 entries .* index \(1,\): 2.0"):
            loss(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))

    def test_non_finite_logits_and_negative_weights(self):
        loss = BCEWithLogitsLoss(check_inputs=True)
        with pytest.raises(ValueError, match=r"`logits` to be finite, got 2 entries .* index \(0, 1\): nan"):
            loss(torch.tensor([[0.0, float("nan")], [float("inf"), 0.0]]), torch.zeros(2, 2))
        with pytest.raises(ValueError, match=r"`weights` to be finite in \[0, inf\], got 1 entries .*: -1.0"):
            loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]))

    def test_valid_inputs_pass(self):
        loss = BCEWithLogitsLoss(check_inputs=True)
        torch.testing.assert_close(loss(torch.zeros(2), torch.tensor([0, 1])), torch.tensor(0.6931), atol=1e-4, rtol=0)


class TestCrossEntropy:
    def test_class_index_out_of_range_but_ignore_index_allowed(self):
        loss = CrossEntropyLoss(check_inputs=True, ignore_index=-1)
        loss(torch.zeros(3, 4), torch.tensor([0, -1, 3]))
        with pytest.raises(ValueError, match=r"`labels` to be an integer in \[0, 3\] or -1, got 1 entries .*: 4"):
            loss(torch.zeros(3, 4), torch.tensor([0, 4, -1]))

    def test_probabilities(self):
        loss = CrossEntropyLoss(check_inputs=True)
        with pytest.raises(ValueError, match=r"`labels` to be finite in \[0, 1\]"):
            loss(torch.zeros(2, 2), torch.tensor([[0.5, 0.5], [1.5, -0.5]]))


class TestMultiTask:
    def test_unlabelled_entries_are_not_checked(self):
        loss = MultiTaskLoss(["fav", "reply"], check_inputs=True)
        labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
        mask = torch.tensor([[True, False], [True, True]])
        out = loss(torch.zeros(2, 2), labels, mask=mask)
        assert torch.isfinite(out["loss"])
        with pytest.raises(ValueError, match=r"`labels` to be finite in \[0, 1\], got 1 entries .* \(0, 1\): nan"):
            loss(torch.zeros(2, 2), labels)

    def test_cross_entropy_class_range(self):
        loss = MultiTaskLoss(["a", "b"], loss_type="cross_entropy", check_inputs=True)
        with pytest.raises(
            ValueError, match=r"`labels` to be an integer in \[0, 2\] or -100, got 1 entries .* \(1, 0\): 3"
        ):
            loss(torch.zeros(2, 2, 3), torch.tensor([[0, 2], [3, 1]]))

    def test_off_by_default_lets_values_through(self):
        out = MultiTaskLoss(["fav"])(torch.zeros(2, 1), torch.tensor([[0.5], [3.0]]))
        assert torch.isfinite(out["loss"])


class TestCrossEntropyLabelsOutOfRange:
    """-1 and 7 for 5 classes: a named ValueError with check_inputs=True; -100 is ignored, not an error."""

    @pytest.mark.parametrize("bad", [-1, 7])
    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8])
    def test_multi_task(self, bad, dtype):
        loss = MultiTaskLoss(["a", "b"], loss_type="cross_entropy", check_inputs=True)
        labels = torch.tensor([[0, -100], [4, bad]], dtype=dtype)
        with pytest.raises(ValueError, match=rf"`labels` to be an integer in \[0, 4\] or -100, .* \(1, 1\): {bad}"):
            loss(torch.zeros(2, 2, 5), labels)
        mask = torch.tensor([[True, True], [True, False]])
        assert torch.isfinite(loss(torch.zeros(2, 2, 5), labels, mask=mask)["loss"])

    @pytest.mark.parametrize("bad", [-1, 7])
    def test_single_task(self, bad):
        loss = CrossEntropyLoss(check_inputs=True)
        with pytest.raises(ValueError, match=rf"`labels` to be an integer in \[0, 4\] or -100, .* \(1,\): {bad}"):
            loss(torch.zeros(2, 5), torch.tensor([-100, bad], dtype=torch.int32))

    def test_without_checks_torch_raises_its_own_index_error_on_the_cpu(self):
        # The documented behaviour without check_inputs: whatever torch's gather does (a RuntimeError on the CPU).
        with pytest.raises(RuntimeError, match="index 7 is out of bounds"):
            MultiTaskLoss(["a"], loss_type="cross_entropy")(torch.zeros(2, 1, 5), torch.tensor([[0], [7]]))

    def test_unlabelled_logits_and_weights_are_not_checked(self):
        loss = MultiTaskLoss(["a", "b"], loss_type="cross_entropy", check_inputs=True)
        logits = torch.zeros(2, 2, 3)
        logits[1, 1] = float("nan")
        weights = torch.tensor([[1.0, 1.0], [1.0, float("inf")]])
        for labels, mask in (
            (torch.tensor([[0, 1], [2, -100]]), None),
            (torch.tensor([[0, 1], [2, 1]]), torch.tensor([[True, True], [True, False]])),
        ):
            assert torch.isfinite(loss(logits, labels, weights, mask)["loss"])
        with pytest.raises(ValueError, match=r"`logits` to be finite, got 3 entries .* \(1, 1, 0\): nan"):
            loss(logits, torch.tensor([[0, 1], [2, 1]]), weights)
