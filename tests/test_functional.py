import pytest
import torch
import torch.nn.functional as F

from losses import functional
from losses._fused_bce import column_sums


@pytest.mark.parametrize("rows", [1, 255, 8191, 8192, 8192 + 255, 65536 + 17])
@pytest.mark.parametrize("columns", [1, 3, 64])
def test_column_sums_equal_a_float64_row_sum(rows, columns):
    block = torch.rand(rows, columns, generator=torch.Generator().manual_seed(rows + columns))
    exact = block.double().sum(0)
    torch.testing.assert_close(column_sums(block).double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(column_sums(block.double()), exact, rtol=1e-13, atol=0)


def test_reduce_tasks_median_of_an_even_count_is_the_lower_middle():
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert functional.reduce_tasks(losses, torch.ones(4), "median").item() == 2.0
    assert functional.reduce_tasks(losses, torch.tensor([1.0, 1.0, 1.0, 10.0]), "max").item() == 20.0


def test_multi_task_bce_scales_and_totals():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (10, 3), generator=gen).double()
    pos_weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sums, zero = functional.multi_task_bce(logits, labels, pos_weight)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=pos_weight, reduction="none"
    ).sum(0)
    torch.testing.assert_close(sums, expected)
    assert zero.item() == 0.0
    scale = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)
    tau = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    scaled, total = functional.multi_task_bce(logits, labels, pos_weight, scale=scale, task_weight=tau, factor=0.25)
    torch.testing.assert_close(scaled, expected * scale)
    torch.testing.assert_close(total, (expected * scale * tau).sum() * 0.25)


class TestCrossEntropyDenominator:
    """Only a zero denominator is replaced; torch divides by any other, negative ones included."""

    def test_negative_selected_class_weight_sum_is_divided_by(self):
        logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
        labels = torch.tensor([0, 2])
        class_weight = torch.tensor([-1.0, 1.0, -2.0])
        ours = functional.cross_entropy(logits, labels, class_weight=class_weight)
        ref = torch.nn.functional.cross_entropy(logits, labels, weight=class_weight)
        assert round(ref.item(), 4) == 2.4076
        torch.testing.assert_close(ours, ref)
        (ours_grad,) = torch.autograd.grad(ours, logits)
        (ref_grad,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(ours_grad, ref_grad)

    def test_a_zero_denominator_gives_zero_and_a_zero_gradient(self):
        logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]], requires_grad=True)
        out = functional.cross_entropy(logits, torch.tensor([0, 2]), class_weight=torch.tensor([1.0, 0.0, -1.0]))
        assert out.item() == 0.0
        (grad,) = torch.autograd.grad(out, logits)
        assert torch.equal(grad, torch.zeros(2, 3))


class TestMultiTaskBCEAtExtremeLogits:
    """The fused BCE gives what torch's BCE gives, loss and gradient, for finite and infinite logits."""

    INF = float("inf")
    LOGITS = (INF, -INF, 1e30, -1e30, 100.0, -100.0, 50.0, -50.0, 20.0, -20.0, 0.0, 1.5)
    LABELS = (0.0, 1.0, 0.3)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("weight", [None, 0.5, 0.0])
    def test_each_entry_matches_torch(self, dtype, weight):
        pos_weight = torch.tensor([1.0, 3.0, 0.0], dtype=dtype)
        for x in self.LOGITS:
            for y in self.LABELS:
                logits = torch.full((1, 3), x, dtype=dtype, requires_grad=True)
                labels = torch.full((1, 3), y, dtype=dtype)
                weights = None if weight is None else torch.full((1, 3), weight, dtype=dtype)
                ours, _ = functional.multi_task_bce(logits, labels, pos_weight, weights)
                ref_in = logits.detach().clone().requires_grad_()
                ref = torch.nn.functional.binary_cross_entropy_with_logits(
                    ref_in, labels, weight=weights, pos_weight=pos_weight, reduction="none"
                )[0]
                torch.testing.assert_close(ours, ref, equal_nan=True, msg=f"loss at x={x}, y={y}")
                for t in range(3):
                    (grad,) = torch.autograd.grad(ours[t], logits, retain_graph=True)
                    (ref_grad,) = torch.autograd.grad(ref[t], ref_in, retain_graph=True)
                    torch.testing.assert_close(grad, ref_grad, equal_nan=True, msg=f"gradient at x={x}, y={y}, t={t}")

    @pytest.mark.parametrize("weight", [None, 0.5])
    def test_each_entry_matches_torch_under_torch_compile(self, weight):
        torch._dynamo.reset()
        fused = torch.compile(
            lambda x, y, p, w: functional.multi_task_bce(x, y, p, w)[0], fullgraph=True, dynamic=False
        )
        pos_weight = torch.tensor([1.0, 3.0, 0.0])
        weights = None if weight is None else torch.full((1, 3), weight)
        for x in self.LOGITS:
            for y in self.LABELS:
                logits = torch.full((1, 3), x, requires_grad=True)
                labels = torch.full((1, 3), y)
                ours = fused(logits, labels, pos_weight, weights)
                ref_in = logits.detach().clone().requires_grad_()
                ref = torch.nn.functional.binary_cross_entropy_with_logits(
                    ref_in, labels, weight=weights, pos_weight=pos_weight, reduction="none"
                )[0]
                torch.testing.assert_close(ours, ref, equal_nan=True, msg=f"loss at x={x}, y={y}")
                (grad,) = torch.autograd.grad(ours.sum(), logits)
                (ref_grad,) = torch.autograd.grad(ref.sum(), ref_in)
                torch.testing.assert_close(grad, ref_grad, equal_nan=True, msg=f"gradient at x={x}, y={y}")
        torch._dynamo.reset()


class TestArgumentChecks:
    """The public functions check their arguments as the modules do: named errors, never a deep one."""

    def test_unknown_global_reduction(self):
        # An unknown reduction fell through to the median (2.0) without a word.
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum', 'min', 'max', 'median'\)"):
            functional.reduce_tasks(torch.tensor([1.0, 2.0, 6.0]), torch.ones(3), "avg")  # type: ignore[arg-type]

    def test_reduce_tasks_shapes(self):
        with pytest.raises(ValueError, match=r"`task_weight` to hold one value per task, shape \(3,\), got \(2,\)"):
            functional.reduce_tasks(torch.ones(3), torch.ones(2), "mean")
        with pytest.raises(ValueError, match=r"`task_losses` of shape \(T\) or \(T, B\), got \(\)"):
            functional.reduce_tasks(torch.tensor(1.0), torch.ones(1), "mean")

    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            (
                {"labels": torch.ones(4, 1)},
                ValueError,
                r"`labels` to have the shape of `logits` \(4, 3\), got \(4, 1\)",
            ),
            ({"mask": torch.ones(4, 1, dtype=torch.bool)}, ValueError, r"`mask` to have the shape of `logits`"),
            ({"mask": torch.ones(4, 3)}, TypeError, r"`mask` to be a bool tensor, got dtype torch.float32"),
            ({"pos_weight": torch.ones(2)}, ValueError, r"`pos_weight` to hold one value per task, shape \(3,\)"),
            ({"logits": torch.zeros(4, 3, dtype=torch.long)}, TypeError, r"`logits` to be a floating point tensor"),
            ({"labels": [[1.0] * 3] * 4}, TypeError, r"`labels` to be a torch.Tensor, got list"),
        ],
    )
    @pytest.mark.parametrize("function", ["multi_task_bce", "multi_task_bce_elements"])
    def test_multi_task_bce(self, function, kwargs, error, message):
        arguments = {"logits": torch.zeros(4, 3), "labels": torch.ones(4, 3), "pos_weight": torch.ones(3)} | kwargs
        with pytest.raises(error, match=message):
            getattr(functional, function)(**arguments)

    def test_multi_task_bce_per_task_vectors(self):
        logits, labels, pos_weight = torch.zeros(4, 3), torch.ones(4, 3), torch.ones(3)
        with pytest.raises(ValueError, match=r"`task_weight` to hold one value per task, shape \(3,\), got \(4,\)"):
            functional.multi_task_bce(logits, labels, pos_weight, task_weight=torch.ones(4), factor=1.0)
        with pytest.raises(ValueError, match=r"`scale` to hold one value per task, shape \(3,\), got \(1,\)"):
            functional.multi_task_bce(logits, labels, pos_weight, scale=torch.ones(1))

    def test_multi_task_cross_entropy(self):
        logits = torch.randn(4, 2, 3)
        # Transposed labels [T, B] hold as many entries: they paired with the wrong rows, or broke deep in torch.
        with pytest.raises(ValueError, match=r"`labels` of shape \[B, T\] \(4, 2\) .* got \(2, 4\)"):
            functional.multi_task_cross_entropy(logits, torch.randint(0, 3, (2, 4)))
        # Float labels were truncated to class indices without a word.
        with pytest.raises(
            TypeError, match="cross-entropy `labels` to be integer class indices, got dtype torch.float32"
        ):
            functional.multi_task_cross_entropy(logits, torch.rand(4, 2))

    def test_single_task_options(self):
        logits, labels = torch.zeros(2), torch.ones(2)
        with pytest.raises(ValueError, match=r"`label_smoothing` to be in \[0, 1\], got 1.5"):
            functional.binary_cross_entropy_with_logits(logits, labels, label_smoothing=1.5)
        with pytest.raises(ValueError, match=r"`reduction` to be one of \('mean', 'sum', 'none'\), got 'avg'"):
            functional.binary_cross_entropy_with_logits(logits, labels, reduction="avg")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`reduction` to be one of .* got 'avg'"):
            functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="avg")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"`label_smoothing` to be in \[0, 1\], got 2"):
            functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), label_smoothing=2.0)
        with pytest.raises(TypeError, match="`ignore_index` to be an int, got float"):
            functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), ignore_index=1.5)  # type: ignore[arg-type]

    def test_constant_weights_that_require_grad(self):
        # torch differentiates neither; its own error names a kernel, not the argument.
        with pytest.raises(ValueError, match=r"`pos_weight` not to require grad: .* Pass `pos_weight.detach\(\)`"):
            functional.binary_cross_entropy_with_logits(
                torch.zeros(2), torch.ones(2), pos_weight=torch.ones(2, requires_grad=True)
            )
        with pytest.raises(ValueError, match=r"`class_weight` not to require grad"):
            functional.cross_entropy(
                torch.zeros(2, 3), torch.tensor([0, 1]), class_weight=torch.ones(3, requires_grad=True)
            )


def test_multi_task_cross_entropy_sums_keeps_its_0_1_0_meaning():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 2), generator=gen)
    weights = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 2, generator=gen) < 0.7
    sums = functional.multi_task_cross_entropy_sums(logits, labels, weights, mask)
    expected = torch.stack(
        [
            (F.cross_entropy(logits[:, t], labels[:, t], reduction="none") * weights[:, t] * mask[:, t]).sum()
            for t in range(2)
        ]
    )
    torch.testing.assert_close(sums, expected)
