"""Random loss weighting (Lin et al., 2022): fresh random task weights every step."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch

from losses import distributed
from losses.weighting._base import TaskWeighting

#: Seeds and steps each get 32 bits of the generator's seed, so no two (seed, step) pairs share a draw.
_SEED_LIMIT = 2**32


def random_loss_weights(num_tasks: int, seed: int, step: int) -> torch.Tensor:
    r"""RLW's weights for step ``step``: the softmax of a standard normal draw, float64 on the CPU.

    .. math::
        w = \operatorname{softmax}(z), \qquad z \sim \mathcal{N}(0, I_T)

    drawn from a CPU generator seeded with ``seed * 2**32 + step``: the same numbers on every rank,
    every device and every run.

    Example:
        >>> random_loss_weights(3, seed=0, step=0)
        tensor([0.8446, 0.1349, 0.0205], dtype=torch.float64)
    """
    generator = torch.Generator().manual_seed(seed * _SEED_LIMIT + step)
    return torch.softmax(torch.randn(num_tasks, generator=generator, dtype=torch.float64), dim=0)


class RandomLossWeighting(TaskWeighting):
    r"""Weighs the tasks with random weights drawn afresh at every training step.

    .. math::
        w^{(n)} = \operatorname{softmax}(z^{(n)}), \qquad z^{(n)} \sim \mathcal{N}(0, I_T)

    at step :math:`n`: the softmax of a standard normal draw, the default of the paper's
    experiments and of LibMTL (the paper also studies uniform, Bernoulli and Dirichlet draws). The
    weights sum to 1; by symmetry each has mean :math:`1/T`, so on average the loss is
    ``MultiTaskLoss``'s mean over tasks.

    Only calls in training mode (``module.train()``) are steps and draw new weights; in eval mode
    the weights are the mean weights :math:`1/T`, so a validation loss does not depend on the draw.

    Cost and DDP: no collective. The draw at step :math:`n` comes from a CPU generator seeded with
    ``seed`` and :math:`n` (``seed * 2**32 + n``), so every rank draws the same weights to the last
    bit, on any device, and a run resumed from a checkpoint draws what it would have drawn: the step
    count is saved in ``state_dict``. Per step it costs one tiny CPU draw and a copy of :math:`T`
    numbers to the loss's device.

    Args:
        tasks: the task names, in the order of the task losses.
        seed: the seed of the draws, an int in ``[0, 2**32)``; the same on every rank. Default: ``0``.
        process_group: unused (no collective); accepted for a uniform signature. Default: ``None``.

    Shape:
        - input: a dict with a scalar ``"loss/<task>"`` per task (and optionally ``"loss"``).
        - output: ``{"loss/<task>": ..., "weight/<task>": ..., "loss": ...}``.

    Examples:
        >>> rlw = RandomLossWeighting(["click", "fav", "reply"], seed=0)
        >>> losses = {"loss/click": torch.tensor(0.5), "loss/fav": torch.tensor(0.3), "loss/reply": torch.tensor(0.1)}
        >>> out = rlw(losses)
        >>> [round(out[f"weight/{task}"].item(), 4) for task in rlw.tasks], round(out["loss"].item(), 4)
        ([0.8446, 0.1349, 0.0205], 0.4648)
    """

    def __init__(
        self, tasks: Sequence[str], *, seed: int = 0, process_group: Optional[distributed.ProcessGroup] = None
    ) -> None:
        super().__init__(tasks, process_group=process_group)
        given: Any = seed  # typed int, but a NumPy integer is one too (as for losses.Task)
        if isinstance(given, bool) or not isinstance(given, numbers.Integral):
            raise TypeError(f"Expected `seed` to be an int in [0, 2**32), got {type(seed).__name__}.")
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"Expected `seed` to be an int in [0, 2**32), got {seed}.")
        self.seed = int(seed)  # a NumPy integer as a plain int: seed * 2**32 must not overflow
        self.steps = 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"

    def weights(self, task_losses: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.full_like(task_losses, 1.0 / len(self.tasks))
        # The draw (a CPU generator) and the step count are host work: inside torch.compile they
        # run outside the graph, which could neither trace the generator nor keep the count.
        step = _step_outside_graph if torch.compiler.is_compiling() else RandomLossWeighting._step
        return step(self).to(task_losses.device)

    def _step(self) -> torch.Tensor:
        """This step's weights (float64, CPU), and one step more."""
        weights = random_loss_weights(len(self.tasks), self.seed, self.steps)
        self.steps += 1
        return weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


#: ``_step`` for a call inside ``torch.compile``: a graph break instead of an untraceable generator.
_step_outside_graph = torch.compiler.disable(RandomLossWeighting._step)  # type: ignore[no-untyped-call]
