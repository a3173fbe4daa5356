"""Differentiable twins of `torch.optim` optimizers (filled in by the optimizer work)."""

__all__: list[str] = []
