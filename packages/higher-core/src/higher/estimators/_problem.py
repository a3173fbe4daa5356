"""`InnerProblem`: a model, a torch optimizer and a loss as the estimators' `unroll`, run by the
engine's pure step (`higher._engine.pure_step`), the step every other strategy wraps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from higher._context import check_model_and_opt
from higher._engine import Batch, LossFn, Program, bind, follow_modes, func_gradient, pure_step
from higher._errors import EstimatorError
from higher._strategies import refuse_hand_written
from higher.estimators._particles import detached
from higher.optim import get_diff_optim, internal
from higher.patch import monkeypatch


class ProblemState(NamedTuple):
    """Where an inner problem is: every parameter (in `model.parameters()` order), the
    optimizer's state (one per bucket of its step plan) and the model's buffers."""

    params: list[torch.Tensor]
    opt_state: list[Any]
    buffers: dict[str, torch.Tensor]


class InnerProblem:
    """The ordinary inner loop — `model`, the differentiable twin of the torch optimizer `opt`
    (built-in or a plugin's), `loss_fn(fmodel, *batch)` — as the `unroll` and `init` of the
    estimators (`PES`, `TruncatedES`, `TruncatedBackprop`, and `es_gradient` over a whole
    unroll). Its meta-parameters are the options of `opt` named in `hyper` (one value each,
    used by every param group: a learning rate, a learned optimizer's weights) and, with
    `weights=True`, the model's initial parameters.

    `unroll(meta, state, *data, **kwargs)` takes `len(data[0])` inner steps: every positional
    tensor of `data` carries the step dimension first (step `k` sees `data[i][k]`; keyword
    arguments are the same at every step). Its loss is the sum over the steps of `loss_fn` at
    the weights before each step, or, with `meta_loss_fn`, of `meta_loss_fn(fmodel, *batch)` at
    the weights after it. Each step is the engine's pure step (the one a compiled step traces):
    the gradient by `torch.func.grad`, so that the particles run as one vmapped batch and
    truncated backprop differentiates through it. Every parameter that requires grad is
    stepped (freeze one with `requires_grad_(False)`). The model and the optimizer are never
    changed; the optimizer's current state is where every problem starts.

    Examples:
        >>> import torch, higher.estimators as est
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 1).double()
        >>> mse = lambda m, x, y: (m(x) - y).pow(2).mean()
        >>> problem = est.InnerProblem(net, torch.optim.SGD(net.parameters(), lr=0.1), mse,
        ...                            hyper=["lr"])
        >>> meta = problem.meta()
        >>> meta[0]
        tensor(0.1000, dtype=torch.float64)
        >>> x, y = torch.randn(5, 8, 3, dtype=torch.float64), torch.zeros(5, 8, 1).double()
        >>> state, loss = problem.unroll(meta, problem.init(meta), x, y)  # five steps
        >>> len(state.params), loss.shape
        (2, torch.Size([]))
    """

    def __init__(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        hyper: Sequence[str] = (),
        weights: bool = False,
        meta_loss_fn: LossFn | None = None,
    ) -> None:
        check_model_and_opt(model, opt)
        if not callable(loss_fn) or (meta_loss_fn is not None and not callable(meta_loss_fn)):
            raise EstimatorError("InnerProblem: loss_fn and meta_loss_fn must be callable")
        if isinstance(hyper, str):
            hyper = (hyper,)
        if not all(isinstance(h, str) for h in hyper) or len(set(hyper)) != len(hyper):
            raise EstimatorError(
                f"InnerProblem: hyper must name distinct options of the optimizer, got {hyper!r}"
            )
        if not isinstance(weights, bool):
            raise EstimatorError(f"InnerProblem: weights must be a bool, got {weights!r}")
        params = list(model.parameters())
        if not params:
            raise EstimatorError("InnerProblem: the model has no parameters")
        self._model = model
        self._module = monkeypatch(model)
        names = tuple(self._module.named_fast_params())
        twin = get_diff_optim(opt, params)
        stepped = [p.requires_grad for p in params]
        plan = internal.plan(twin, params, stepped=stepped)
        refuse_hand_written(plan, twin, "InnerProblem", EstimatorError)
        if not plan.buckets:
            raise EstimatorError("InnerProblem: no parameter of the model requires grad")
        for name in hyper:
            missing = [b.group for b in plan.buckets if name not in b.hyper]
            if missing:
                raise EstimatorError(
                    f"InnerProblem: {plan.name} has no option {name!r} (param group "
                    f"{missing[0]}); its options: {sorted(plan.buckets[0].hyper)}"
                )
        floating = params[0].is_floating_point()
        self._dtype = params[0].dtype if floating else torch.get_default_dtype()
        self._start = [self._hyper_value(name, plan.buckets[0].hyper[name]) for name in hyper]
        self._plan = plan._replace(options=[], requires_grad=[])
        self._states = detached([b.state for b in plan.buckets])
        self._hyper = tuple(hyper)
        self._weights = weights
        self._params = [p.detach() for p in params]
        self._buffers = {k: b.detach() for k, b in model.named_buffers()}
        self._wrt = [i for i, s in enumerate(stepped) if s]
        self._program = Program(self._module, names, loss_fn)
        self._meta_loss_fn = meta_loss_fn

    def _hyper_value(self, name: str, value: object) -> torch.Tensor:
        """An option's value as a meta-parameter: a floating tensor of the parameters' dtype."""
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise EstimatorError(
                f"InnerProblem: option {name!r} is {value!r}; a meta-parameter is one number or "
                "one tensor (a pair such as betas, or a list per parameter, is not)"
            )
        return torch.as_tensor(value, dtype=self._dtype).detach().clone()

    @property
    def hyper(self) -> tuple[str, ...]:
        """The optimizer options that are meta-parameters, in the order of `meta()`."""
        return self._hyper

    def meta(self) -> list[torch.Tensor]:
        """The starting meta-parameters (new tensors): the options named in `hyper`, then, with
        `weights=True`, the model's parameters."""
        weights = [p.clone() for p in self._params] if self._weights else []
        return [h.clone() for h in self._start] + weights

    def init(self, meta: Sequence[torch.Tensor]) -> ProblemState:
        """Where the problem starts: the initial weights (`meta`'s with `weights=True`, else
        the model's), the optimizer's state and the model's buffers."""
        meta = self._check(meta)
        params = list(meta[len(self._hyper) :]) if self._weights else list(self._params)
        return ProblemState(params, list(self._states), dict(self._buffers))

    def unroll(
        self, meta: Sequence[torch.Tensor], state: ProblemState, *data: Any, **kwargs: Any
    ) -> tuple[ProblemState, torch.Tensor]:
        """`len(data[0])` inner steps from `state` at `meta`; the new state and the sum of the
        steps' losses."""
        meta = self._check(meta)
        values = dict(zip(self._hyper, meta))
        plan = self._plan
        if values:
            buckets = [b._replace(hyper={**b.hyper, **values}) for b in plan.buckets]
            plan = plan._replace(buckets=buckets)
        follow_modes(self._module, self._model)
        params, opt_state, buffers = state
        total: torch.Tensor | None = None
        for k in range(_steps(data)):
            batch = Batch(tuple(a[k] if isinstance(a, torch.Tensor) else a for a in data), kwargs)
            out = pure_step(
                params, opt_state, plan, buffers, batch,
                program=self._program, wrt=self._wrt, gradient=func_gradient,
            )  # fmt: skip
            params, opt_state, buffers = out.params, out.opt_state, out.buffers
            loss = out.loss if self._meta_loss_fn is None else self._after(params, buffers, batch)
            total = loss if total is None else total + loss
        assert total is not None  # _steps is >= 1
        return ProblemState(params, opt_state, buffers), total

    def params(self, state: ProblemState) -> list[torch.Tensor]:
        """The weights of `state`, in `model.parameters()` order."""
        return list(state.params)

    def forward(self, state: ProblemState, *args: Any, **kwargs: Any) -> Any:
        """The model's forward at `state`'s weights and buffers (the buffers are not moved)."""
        model, _ = bind(self._module, self._program.names, state.params, state.buffers)
        return model(*args, **kwargs)

    def _after(
        self, params: list[torch.Tensor], buffers: dict[str, torch.Tensor], batch: Batch
    ) -> torch.Tensor:
        assert self._meta_loss_fn is not None
        model, _ = bind(self._module, self._program.names, params, buffers)
        return self._meta_loss_fn(model, *batch.args, **batch.kwargs)

    def _check(self, meta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        expected = len(self._hyper) + (len(self._params) if self._weights else 0)
        meta = list(meta)
        if len(meta) != expected:
            what = f"{len(self._hyper)} option value(s) {list(self._hyper)}"
            if self._weights:
                what += f" then {len(self._params)} initial weights"
            raise EstimatorError(f"InnerProblem: expected {expected} meta-parameters ({what}), "
                                 f"got {len(meta)}")  # fmt: skip
        return meta


def _steps(data: tuple[Any, ...]) -> int:
    """The number of steps `data` holds: the common first dimension of its tensors."""
    shapes = [tuple(a.shape) for a in data if isinstance(a, torch.Tensor)]
    if len({s[:1] for s in shapes}) != 1 or () in shapes:
        raise EstimatorError(
            "InnerProblem.unroll: every positional tensor of the data carries the step "
            "dimension first (data[i][k] is step k's), so at least one is needed and all must "
            f"share that dimension; got shapes {shapes}"
        )
    steps = shapes[0][0]
    if steps < 1:
        raise EstimatorError("InnerProblem.unroll: the data holds zero steps")
    return steps
