import pytest
import torch

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
