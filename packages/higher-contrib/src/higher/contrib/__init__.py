"""Extras for `higher`: cuDNN-safe double backward, finite-difference checks, plugin kit."""

__all__: list[str] = []
