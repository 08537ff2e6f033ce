"""Functional operators (no nn.Module): shift-add, folded Shiftwise convolution, depth-wise conv dispatch."""

from .dwconv import dwconv2d, dwconv2d_sum
from .shift_add import (
    fold_shiftwise_weight,
    make_shift_tables,
    num_blocks,
    shift_add,
    shift_offsets,
    shiftwise_conv,
    shiftwise_deploy_conv,
    shiftwise_strips,
    strip_paddings,
)

__all__ = [
    "dwconv2d", "dwconv2d_sum", "shift_offsets", "num_blocks", "make_shift_tables", "shift_add",
    "fold_shiftwise_weight", "strip_paddings", "shiftwise_conv", "shiftwise_deploy_conv", "shiftwise_strips",
]
