"""The package's promises: every public name imports and has a docstring, every docstring's
example runs (doctest), and the weights ship inside the package."""

from __future__ import annotations

import doctest
import importlib

import higher_learned_opt
import pytest

# `_twin`'s one class is documented under the package's name, and its example runs there.
MODULES = ["higher_learned_opt", "higher_learned_opt._rule", "higher_learned_opt._optimizer"]


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_every_public_name_imports_and_is_documented() -> None:
    for name in higher_learned_opt.__all__:
        value = getattr(higher_learned_opt, name)
        if callable(value) and not isinstance(value, tuple):
            assert value.__doc__ and ">>>" in value.__doc__, name


def test_the_weights_ship_as_package_data() -> None:
    from importlib import resources

    text = resources.files("higher_learned_opt").joinpath("pretrained.json").read_text()
    assert '"format": "higher-learned-opt/weights"' in text
