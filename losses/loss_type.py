"""The kinds of loss the library builds, as configuration values."""

from __future__ import annotations

from enum import Enum
from typing import Union


class LossType(str, Enum):
    """A loss kind, usable wherever a config file holds its string value.

    ``LossType("bce_with_logits") is LossType.BCE_WITH_LOGITS``; an unknown value raises a
    ``ValueError`` that lists the valid ones. ``str()`` and f-strings give the value, as for a
    plain string (a ``str`` Enum gives ``"LossType.BCE_WITH_LOGITS"`` on Python 3.11), so a config
    or run name written with ``f"{loss_type}"`` reads back.

    Example:
        >>> LossType("cross_entropy")
        <LossType.CROSS_ENTROPY: 'cross_entropy'>
        >>> LossType.BCE_WITH_LOGITS == "bce_with_logits"
        True
        >>> f"{LossType.BCE_WITH_LOGITS}"
        'bce_with_logits'
    """

    CROSS_ENTROPY = "cross_entropy"
    BCE_WITH_LOGITS = "bce_with_logits"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)

    @classmethod
    def _missing_(cls, value: object) -> LossType:
        valid = tuple(member.value for member in cls)
        raise ValueError(f"Expected `loss_type` to be one of {valid}, got {value!r}.")


def parse_loss_type(value: Union[LossType, str]) -> LossType:
    """Return ``value`` as a :class:`LossType`; a string is converted, anything else rejected."""
    if isinstance(value, LossType):
        return value
    if not isinstance(value, str):
        raise TypeError(f"Expected `loss_type` to be a LossType or str, got {type(value).__name__}.")
    return LossType(value)
