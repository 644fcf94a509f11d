import pytest

from losses import LossType
from losses.loss_type import parse_loss_type


def test_values_and_string_conversion():
    assert LossType("bce_with_logits") is LossType.BCE_WITH_LOGITS
    assert LossType("cross_entropy") is LossType.CROSS_ENTROPY
    assert LossType.CROSS_ENTROPY == "cross_entropy"
    assert [member.value for member in LossType] == ["cross_entropy", "bce_with_logits"]


def test_unknown_value_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"`loss_type`.*\('cross_entropy', 'bce_with_logits'\), got 'mse'"):
        LossType("mse")


def test_parse_accepts_members_and_strings_only():
    assert parse_loss_type("bce_with_logits") is LossType.BCE_WITH_LOGITS
    assert parse_loss_type(LossType.CROSS_ENTROPY) is LossType.CROSS_ENTROPY
    with pytest.raises(ValueError, match="got 'BCE'"):
        parse_loss_type("BCE")
    with pytest.raises(TypeError, match="`loss_type` to be a LossType or str, got int"):
        parse_loss_type(1)  # type: ignore[arg-type]


@pytest.mark.parametrize("member", list(LossType))
def test_str_and_format_give_the_value_which_reads_back(member):
    # A str Enum formats as "LossType.BCE_WITH_LOGITS" on Python 3.11, which LossType() rejects.
    assert f"{member}" == str(member) == format(member) == member.value
    assert f"{member:>20}" == f"{member.value:>20}"
    assert LossType(f"{member}") is member
    assert repr(member) == f"<LossType.{member.name}: '{member.value}'>"
