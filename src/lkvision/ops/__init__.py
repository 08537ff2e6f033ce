"""Functional operators (no nn.Module): shift-add, folded Shiftwise convolution, depth-wise conv dispatch."""
