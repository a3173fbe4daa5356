"""What the memory modes share: the step driver that routes `diffopt.step` to a mode, the
state a step ran with besides its weights (random numbers, buffers, train/eval flags), and the
checks that a step's graph reaches only the tensors a mode tracks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch.overrides import TorchFunctionMode

from higher._errors import UnrollError
from higher._trees import tensors
from higher._unroll.modes import Mode
from higher.optim import DifferentiableOptimizer, internal
from higher.optim.internal import StepPlan
from higher.patch import FunctionalModule

GradCallback = Callable[[list[torch.Tensor | None]], Sequence[torch.Tensor | None]]


# ---- routing `diffopt.step` to a mode ---------------------------------------------------------


class Driver(Protocol):
    """A memory mode's way of taking one step (`step`) and of ending the unroll (`close`)."""

    @property
    def mode(self) -> Mode: ...

    def step(
        self,
        diffopt: DifferentiableOptimizer,
        loss: torch.Tensor | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> list[torch.Tensor]: ...

    def close(self, diffopt: DifferentiableOptimizer) -> None: ...


def check_routable(twin: type[DifferentiableOptimizer], strategy: str, argument: str) -> None:
    """Refuse a twin whose class overrides `step`: `strategy` (a memory mode, or compiled
    steps) could not take its steps; the error names it and the `innerloop_ctx` argument to
    drop for the plain unroll."""
    if twin.step is not DifferentiableOptimizer.step:
        raise UnrollError(
            f"{twin.__name__} overrides step, so {strategy} cannot take its steps: they "
            "drive an optimizer through the step protocol (plan, update, commit) only. Use "
            f"the plain unroll with it: innerloop_ctx(model, opt) without {argument}"
        )


class _Route:
    """The step driver a memory mode sets on its optimizer: `diffopt.step` is the mode's (plan,
    update and commit of the step protocol, run the mode's way); everything else is the
    twin's. An object, not a closure, so that a deep copy of the optimizer copies the mode."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def __call__(
        self,
        diffopt: DifferentiableOptimizer,
        loss: torch.Tensor | None,
        params: Iterable[torch.Tensor] | None,
        override: Mapping[str, Sequence[Any]] | None,
        grad_callback: GradCallback | None,
        closure: Callable[[], torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> list[torch.Tensor]:
        if params is not None:
            raise UnrollError(
                "in a memory mode, step takes the functional model's fast weights: drop params="
            )
        return self.driver.step(diffopt, loss, override, grad_callback, closure, kwargs)


def attach(diffopt: DifferentiableOptimizer, driver: Driver | None) -> None:
    """Route `diffopt.step` to `driver` (None: back to plain steps)."""
    internal.set_step_driver(diffopt, None if driver is None else _Route(driver))


def routed(diffopt: DifferentiableOptimizer) -> Driver | None:
    """The driver that takes `diffopt`'s steps (a memory mode's, or the compiled loop's), or
    None where the optimizer takes its own."""
    route = internal.step_driver(diffopt)
    return route.driver if isinstance(route, _Route) else None


def require_closure(
    mode: str, loss: torch.Tensor | None, closure: Callable[[], torch.Tensor] | None
) -> Callable[[], torch.Tensor]:
    """The closure of a step in a mode that runs it again, or a clear error."""
    if closure is None:
        raise UnrollError(
            f"unroll={mode} rebuilds each step during the backward pass, so it needs the loss "
            "as a closure that computes it again: diffopt.step(closure=lambda: "
            "loss_fn(fmodel(x), y)) (bind loop variables: lambda x=x, y=y: ...), not a loss "
            "tensor" + ("" if loss is not None else " (step got neither)")
        )
    if loss is not None:
        raise UnrollError("give step either the loss or a closure that computes it, not both")
    if not callable(closure):
        raise UnrollError(f"closure must be callable, got {type(closure).__name__}")
    return closure


def scalar_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UnrollError(f"the closure must return a scalar tensor (one element), got {shape}")
    return loss


def hyper_tensors(plan: StepPlan) -> list[torch.Tensor]:
    """The tensors among the hyperparameters a step uses that require grad (once each): those
    of the groups it steps (for a hand-written `_update`, of every group: it reads them all)."""
    found: dict[int, torch.Tensor] = {}
    for bucket in plan.buckets:
        _requiring_grad(bucket.hyper, found)
    if plan.rule is None:
        for options in plan.options:
            _requiring_grad(options, found)
    return list(found.values())


def _requiring_grad(x: Any, found: dict[int, torch.Tensor]) -> None:
    if isinstance(x, Mapping):  # a param group's options: its params are not hyperparameters
        x = {key: value for key, value in x.items() if key != "params"}
    for t in tensors(x):
        if t.requires_grad:
            found.setdefault(id(t), t)


def stripped(plan: StepPlan) -> StepPlan:
    """`plan` without what it holds of this step's tensors (the buckets' states, the groups'
    parameter lists): what a later `plan.update(params, grads, states)` still needs."""
    return plan._replace(
        buckets=[
            b._replace(state=None, hyper={k: v for k, v in b.hyper.items() if k != "params"})
            for b in plan.buckets
        ],
        options=[{k: v for k, v in o.items() if k != "params"} for o in plan.options],
    )


# ---- what a step ran with besides its weights ------------------------------------------------


class StepEnv(NamedTuple):
    """Random-number state (None: the step drew none), buffers and train/eval flags of a step."""

    rng: tuple[torch.Tensor, ...] | None
    buffers: tuple[torch.Tensor, ...]
    training: tuple[bool, ...]


class Environment:
    """The functional model's state besides its weights, as each step found it: recomputing a
    step restores it (the same dropout masks, running statistics as they were, the same
    train/eval mode), and leaves the model as it was afterwards (running statistics move once,
    as in a plain unroll)."""

    def __init__(self, fmodel: FunctionalModule) -> None:
        self.fmodel = fmodel
        self.modules = list(fmodel.modules())
        seen: set[tuple[int, str]] = set()
        self.places: list[tuple[torch.nn.Module, str]] = []
        for module in self.modules:
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and (id(module), name) not in seen:
                    seen.add((id(module), name))
                    self.places.append((module, name))
        devices = {p.device for p in fmodel.fast_params}
        self.devices = sorted(d.index or 0 for d in devices if d.type == "cuda")
        # the buffers as the next step finds them: copies, never the live tensors (a tensor
        # updated in place always equals itself, so a change would go unseen)
        self.values = tuple(b.detach().clone() for b in self._live())
        self.training = tuple(m.training for m in self.modules)

    def _live(self) -> Iterator[torch.Tensor]:
        for module, name in self.places:
            yield getattr(module, name)

    def _rng(self) -> tuple[torch.Tensor, ...]:
        states = [torch.get_rng_state()]
        states += [torch.cuda.get_rng_state(d) for d in self.devices]
        return tuple(states)

    def before(self) -> StepEnv:
        """What the step about to run finds (cheap: values are shared until they change)."""
        live = list(self._live())
        changed = [not torch.equal(a, b) for a, b in zip(live, self.values)]
        if any(changed):
            self.values = tuple(
                a.detach().clone() if c else b for a, b, c in zip(live, self.values, changed)
            )
        training = tuple(m.training for m in self.modules)
        if training != self.training:
            self.training = training
        return StepEnv(self._rng(), self.values, self.training)

    def after(self, env: StepEnv) -> StepEnv:
        """`env`, without its random-number state if the step drew no random number."""
        assert env.rng is not None
        if all(torch.equal(a, b) for a, b in zip(self._rng(), env.rng)):
            return env._replace(rng=None)
        return env

    @contextlib.contextmanager
    def restored(self, env: StepEnv) -> Iterator[None]:
        """Run a block in the state `env` describes; the model is as before afterwards."""
        with torch.random.fork_rng(devices=self.devices, enabled=env.rng is not None):
            if env.rng is not None:
                torch.set_rng_state(env.rng[0])
                for d, state in zip(self.devices, env.rng[1:]):
                    torch.cuda.set_rng_state(state, d)
            live = list(self._live())
            training = [m.training for m in self.modules]
            try:
                for (module, name), value in zip(self.places, env.buffers):
                    setattr(module, name, value.clone())  # the block may update them in place
                for module, flag in zip(self.modules, env.training):
                    module.training = flag
                yield
            finally:
                for (module, name), value in zip(self.places, live):
                    setattr(module, name, value)
                for module, flag in zip(self.modules, training):
                    module.training = flag


# ---- which tensors a step's graph reaches -----------------------------------------------------


class Captures(TorchFunctionMode):
    """Records the tensors that require grad which the code run under it takes from outside
    (made before it started and not in `own`): the data or hyperparameters a closure uses."""

    def __init__(self, own: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.own = {id(t) for t in own}
        self.made: set[int] = set()
        self.keep: list[torch.Tensor] = []  # what was made stays alive, so ids stay unique
        self.found: dict[int, torch.Tensor] = {}

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        for t in tensors((args, kwargs)):
            key = id(t)
            if t.requires_grad and key not in self.made and key not in self.own:
                self.found.setdefault(key, t)
        out = func(*args, **kwargs)
        made = tensors(out)
        for t in made:
            self.made.add(id(t))
        self.keep.extend(made)
        return out


def unexpected_leaves(
    roots: Sequence[torch.Tensor], known: Iterable[torch.Tensor], stop: Callable[[Any], bool]
) -> list[torch.Tensor]:
    """The leaves requiring grad that the graphs of `roots` reach, other than `known`
    (non-leaf tensors in `known` end the walk where they were made, as do nodes `stop` takes).
    """
    known = list(known)
    known_ids = {id(t) for t in known if t.grad_fn is None}
    ends = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    seen: set[int] = set()
    keep: list[Any] = []
    todo: list[Any] = [r.grad_fn for r in roots if r.grad_fn is not None]
    found: dict[int, torch.Tensor] = {}
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        if id(node) in ends or stop(node):
            continue
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            if id(variable) not in known_ids:
                found.setdefault(id(variable), variable)
            continue
        todo.extend(n for n, _ in node.next_functions)
    return list(found.values())
