"""`LearnedOptimizer`: the learned rule as an ordinary `torch.optim.Optimizer`, and its weights'
file format (JSON: a list of numbers and the layout they fill)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ._rule import N_FEATURES, N_OUTPUTS, check_weights, step_kernel, unpack

FORMAT = "higher-learned-opt/weights"
FORMAT_VERSION = 1
PRETRAINED = "pretrained.json"
MOMENTS = ("exp_avg_fast", "exp_avg", "exp_avg_slow", "exp_avg_sq")  # as LearnedState names them


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real pairs (a view), as the twin steps it; a real one as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def save_weights(weights: torch.Tensor, path: str | Path, **info: Any) -> None:
    """Write `weights` to `path` as JSON (every float32 value exactly), with `info` (e.g. how
    they were trained) kept beside them.

    Examples:
        >>> import tempfile, pathlib, torch
        >>> from higher_learned_opt import init_weights, load_weights, save_weights
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.json"
        >>> save_weights(init_weights(), path, note="untrained")
        >>> torch.equal(load_weights(path), init_weights())
        True
    """
    hidden = check_weights(weights)
    values = weights.detach().to("cpu", torch.float32).tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("save_weights: the weights hold a NaN or an infinity")
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "features": N_FEATURES,
        "hidden": hidden,
        "outputs": N_OUTPUTS,
        "info": info,
        "weights": values,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _parse(text: str, source: str) -> torch.Tensor:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not a weights file (invalid JSON: {err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{source} is not a weights file of format {FORMAT!r}")
    if doc.get("version") != FORMAT_VERSION or doc.get("features") != N_FEATURES:
        raise ValueError(
            f"{source} holds weights of version {doc.get('version')} for "
            f"{doc.get('features')} features; this package reads version {FORMAT_VERSION} "
            f"with {N_FEATURES} features"
        )
    weights = torch.tensor(doc["weights"], dtype=torch.float32)
    if check_weights(weights, where=f"{source}: ") != doc.get("hidden"):
        raise ValueError(f"{source}: {weights.numel()} weights do not fit hidden={doc['hidden']}")
    return weights


def load_weights(path: str | Path) -> torch.Tensor:
    """The weights `save_weights` (or `LearnedOptimizer.save`) wrote to `path`, float32.

    Examples:
        >>> import tempfile, pathlib
        >>> from higher_learned_opt import init_weights, load_weights, save_weights
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.json"
        >>> save_weights(init_weights(hidden=4), path)
        >>> load_weights(path).shape
        torch.Size([50])
    """
    return _parse(Path(path).read_text(encoding="utf-8"), str(path))


def pretrained_weights() -> torch.Tensor:
    """The weights this package ships, meta-trained with PES by examples/learned_optimizer.py
    (small MLPs on scikit-learn's data sets, 100 full-batch steps at `lr=1e-3`).

    Examples:
        >>> from higher_learned_opt import pretrained_weights, weight_count
        >>> pretrained_weights().numel() == weight_count(16)
        True
    """
    text = resources.files(__package__).joinpath(PRETRAINED).read_text(encoding="utf-8")
    return _parse(text, f"{__package__}/{PRETRAINED}")


def pretrained_info() -> dict[str, Any]:
    """What the shipped weights' file says of how they were trained.

    Examples:
        >>> from higher_learned_opt import pretrained_info
        >>> "estimator" in pretrained_info()
        True
    """
    text = resources.files(__package__).joinpath(PRETRAINED).read_text(encoding="utf-8")
    info = json.loads(text).get("info", {})
    return dict(info) if isinstance(info, dict) else {}


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer: every coordinate steps by a small MLP of its gradient, momenta,
    value and the step count (see `higher_learned_opt.FEATURES`), whose weights were
    meta-trained to minimise the training loss of small networks.

    Use it as any `torch.optim` optimizer. `higher` finds its differentiable twin through the
    `higher.optimizers` entry point, so `higher.innerloop_ctx(model, LearnedOptimizer(...))`
    unrolls it, and `higher.estimators.InnerProblem(..., hyper=("weights",))` meta-trains it.

    Args:
        params: parameters or param-group dicts.
        lr: a scale of every step (the pretrained weights were trained at 1e-3; the rule's own
            step size is learned).
        weights: the MLP's weights, a 1-d float tensor (`init_weights`, `load_weights`); None:
            the pretrained weights this package ships.
        maximize: ascend the objective instead.

    Examples:
        >>> import torch
        >>> from higher_learned_opt import LearnedOptimizer
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = LearnedOptimizer([w])
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     (w**2).sum().backward()
        ...     opt.step()
        >>> (w**2).sum().item() < 0.05  # from 2.0
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weights: torch.Tensor | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr!r}; expected a number >= 0")
        if not isinstance(maximize, bool):
            raise TypeError(f"maximize must be a bool, got {maximize!r}")
        weights = pretrained_weights() if weights is None else weights
        check_weights(weights)
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("the learned optimizer's 'weights' hold a NaN or an infinity")
        defaults = {"lr": lr, "weights": weights.detach().clone(), "maximize": maximize}
        super().__init__(params, defaults)

    @classmethod
    def load(
        cls, path: str | Path, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        **options: Any,
    ) -> LearnedOptimizer:  # fmt: skip
        """A `LearnedOptimizer` over `params` with the weights saved at `path`.

        Examples:
            >>> import tempfile, pathlib, torch
            >>> from higher_learned_opt import LearnedOptimizer, init_weights
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.json"
            >>> LearnedOptimizer([w], weights=init_weights(hidden=4)).save(path)
            >>> LearnedOptimizer.load(path, [w]).param_groups[0]["weights"].numel()
            50
        """
        return cls(params, weights=load_weights(path), **options)

    def save(self, path: str | Path, **info: Any) -> None:
        """Write the weights of the first param group to `path` (see `save_weights`).

        Examples:
            >>> import tempfile, pathlib, torch
            >>> from higher_learned_opt import LearnedOptimizer, load_weights
            >>> opt = LearnedOptimizer([torch.nn.Parameter(torch.ones(2))])
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.json"
            >>> opt.save(path)
            >>> torch.equal(load_weights(path), opt.param_groups[0]["weights"].float())
            True
        """
        save_weights(self.param_groups[0]["weights"], path, **info)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one step; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weights = group["weights"]
            layers = unpack(weights, check_weights(weights))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for name in MOMENTS:
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                moments = tuple(_real(state[k]) for k in MOMENTS)
                new_p, new_moments = step_kernel(
                    _real(p), _real(grad), moments, round(float(state["step"])), layers,
                    group["lr"],
                )  # fmt: skip
                _real(p).copy_(new_p)
                for k, value in zip(MOMENTS, new_moments):
                    _real(state[k]).copy_(value)
        return loss
