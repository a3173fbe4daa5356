"""Gradient estimates for long and chaotic unrolls, without backprop through them.

Backprop through an unroll fails in two ways that memory modes and implicit differentiation do
not fix: truncated backprop is biased (it can drive a meta-parameter to the wrong value), and over
long unrolls the meta-loss becomes chaotic, so its exact gradient explodes. Evolution strategies
estimate the gradient of a smoothed meta-loss from perturbed unrolls instead, and persistent
evolution strategies do it over truncations without bias.

- `es_gradient(fn, meta)`: antithetic ES over a whole unroll.
- `PES(unroll, init)`: persistent ES over truncations (Vicol, Metz and Sohl-Dickstein, 2021):
  `pes.step(meta, *data)` per truncation, `pes.reset()` per inner problem; unbiased.
- `TruncatedES`, `TruncatedBackprop`: the biased truncated estimators, for comparison.
- `InnerProblem(model, opt, loss_fn, hyper=..., weights=...)`: the ordinary inner loop (any
  torch optimizer with a twin, plugins included) as an unroll, run by the engine's pure step.

Every estimate is an `Estimate`: the gradients, the standard error of each entry, the mean
loss and the number of unrolls; `estimate.to_grad(meta)` hands it to an ordinary optimizer.
The particles of one estimate run as one batch under `torch.func.vmap`, and over the ranks of
a `torch.distributed` group (`group=`), each rank running its share.

What lives where: `_particles.py` owns the noise, the batched run of the particles, the
estimate and its standard error (`Estimate`) and the shared estimator loop; `_estimators.py`
the estimators; `_problem.py` `InnerProblem`. `EstimatorError` is core's (`_errors.py`).

Examples:
    >>> import torch, higher.estimators as est
    >>> meta = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    >>> e = est.es_gradient(lambda m: (m[0] ** 2).sum(), meta, particles=1024, sigma=0.1,
    ...                     seed=0)
    >>> [round(v) for v in e.grads[0].tolist()]  # d/dm |m|^2 = 2m
    [2, -4]
"""

from higher._errors import EstimatorError as EstimatorError
from higher.estimators._estimators import PES as PES
from higher.estimators._estimators import TruncatedBackprop as TruncatedBackprop
from higher.estimators._estimators import TruncatedES as TruncatedES
from higher.estimators._estimators import es_gradient as es_gradient
from higher.estimators._particles import Estimate as Estimate
from higher.estimators._problem import InnerProblem as InnerProblem
from higher.estimators._problem import ProblemState as ProblemState

__all__ = [
    "es_gradient",
    "PES",
    "TruncatedES",
    "TruncatedBackprop",
    "InnerProblem",
    "ProblemState",
    "Estimate",
    "EstimatorError",
]
