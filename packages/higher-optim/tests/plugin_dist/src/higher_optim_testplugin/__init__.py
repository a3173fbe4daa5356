"""A tiny plugin for `higher.optim`: the Lion optimizer and its differentiable twin."""
