"""Triton kernels behind kiln's GPU tactics; imported only where a GPU tactic needs them."""
