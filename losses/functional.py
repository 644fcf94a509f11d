"""Stateless loss math: the public functions the modules of this package call.

This module gathers them; each kind's math lives in a module of its own:

- single-task BCE and softmax cross-entropy: ``losses/_single_task.py``;
- the multi-task rows over a ``[B, T]`` block, one module per kind: binary
  (``losses/_multi_task_bce.py``, whose fused autograd node is ``losses/_fused_bce.py``),
  multi-class (``losses/_multi_task_cross_entropy.py``), regression
  (``losses/_multi_task_regression.py``);
- from element losses to task losses and one global loss (labelled counts, the reduction over
  tasks): ``losses/_task_reduction.py``;
- the input checks of every call path, one function per path: ``losses/_input_checks.py``;
- the compute dtype (half precision is computed in float32): ``losses/_dtypes.py``.

Every public function checks the types and shapes of its tensor arguments (free: no data is read)
and computes half-precision inputs in float32; an ``unchecked_*`` twin skips the checks, for a
caller that did them once (the modules).
"""

from __future__ import annotations

from losses import _multi_task_cross_entropy
from losses._dtypes import compute_dtype
from losses._input_checks import check_multi_task_inputs, check_weights_and_mask
from losses._multi_task_bce import (
    multi_task_bce,
    multi_task_bce_elements,
    unchecked_multi_task_bce,
    unchecked_multi_task_bce_elements,
)
from losses._multi_task_cross_entropy import (
    multi_task_cross_entropy,
    multi_task_cross_entropy_sums,
    unchecked_multi_task_cross_entropy,
)
from losses._multi_task_regression import multi_task_squared_error, unchecked_multi_task_squared_error
from losses._single_task import Reduction, binary_cross_entropy_with_logits, cross_entropy, safe_divide
from losses._task_reduction import GlobalReduction, reduce_tasks, task_counts

#: The class-index label that marks an entry without a label, as in :func:`torch.nn.functional.cross_entropy`.
IGNORE_INDEX = _multi_task_cross_entropy.IGNORE_INDEX

# In the order of the API reference (docs/api.rst documents them in this order).
__all__ = [
    "compute_dtype",
    "safe_divide",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "check_multi_task_inputs",
    "check_weights_and_mask",
    "multi_task_bce",
    "unchecked_multi_task_bce",
    "IGNORE_INDEX",
    "multi_task_cross_entropy",
    "unchecked_multi_task_cross_entropy",
    "multi_task_cross_entropy_sums",
    "multi_task_bce_elements",
    "unchecked_multi_task_bce_elements",
    "multi_task_squared_error",
    "unchecked_multi_task_squared_error",
    "task_counts",
    "reduce_tasks",
    "Reduction",
    "GlobalReduction",
]
