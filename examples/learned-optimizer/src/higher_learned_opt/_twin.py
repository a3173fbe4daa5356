"""`DifferentiableLearnedOptimizer`: the twin `higher` unrolls, found through the entry point."""

from __future__ import annotations

import higher.optim

from ._rule import LEARNED


class DifferentiableLearnedOptimizer(higher.optim.RuleOptimizer):
    """The differentiable twin of `higher_learned_opt.LearnedOptimizer`, found by `higher`
    through the entry point `higher.optimizers`; its `weights` (and `lr`) may be tensors that
    require grad (`override={"weights": [w]}`), which is how the rule is meta-trained.

    Examples:
        >>> import torch, higher.optim
        >>> from higher_learned_opt import LearnedOptimizer, DifferentiableLearnedOptimizer
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> diffopt = higher.optim.get_diff_optim(LearnedOptimizer([w]), [w])
        >>> isinstance(diffopt, DifferentiableLearnedOptimizer)
        True
        >>> diffopt.step(w.sum(), params=[w])[0].item() < 1.0
        True
    """

    rule = LEARNED
