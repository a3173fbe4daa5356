"""The conformance kit of `higher-contrib`, run on the plugin: what every plugin should run."""

from __future__ import annotations

from higher_lion import DifferentiableLion, Lion

from higher.contrib import ConformanceCase, parametrize_conformance

GRID = {"lr": [1e-3, 0.1], "weight_decay": [0.0, 0.5], "maximize": [False, True]}


@parametrize_conformance(
    Lion, DifferentiableLion, GRID, hyperparameters=["lr", "betas", "weight_decay"]
)
def test_lion_conforms(conformance_case: ConformanceCase) -> None:
    conformance_case.run()


@parametrize_conformance(Lion, DifferentiableLion, [{"betas": (0.5, 0.9)}, {"betas": (0.0, 0.0)}])
def test_lion_conforms_at_other_betas(conformance_case: ConformanceCase) -> None:
    conformance_case.run()
