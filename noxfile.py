"""Sessions for the `higher` workspace.

Quick loop (torch 2.13.0, the CPU wheel at hand):   nox -s tests
One torch of the matrix:                            nox -s tests-2.1.2
Everything CI runs:                                  nox -t ci
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ("higher-errors", "higher-patch", "higher-optim", "higher-core", "higher-contrib")
SRC_DIRS = [f"packages/{p}/src" for p in PACKAGES]

# torch version -> the Python that runs it. The oldest torch runs on the oldest Python we support.
TORCH_MATRIX = {"2.1.2": "3.10", "2.13.0": "3.11", "2.14.1": "3.11"}
TORCH_AT_HAND = "2.13.0"  # its CPU wheel lies on disk: the quick loop never downloads torch
# torch wheels built against NumPy 1.x warn (an error under -W error) beside NumPy 2.
NUMPY_FOR = {"2.1.2": "numpy<2"}
# Distributions the tests need installed besides the four (plugin distributions, examples).
EXTRA_TEST_INSTALLS: list[str] = [
    "examples/lion-plugin",
    "packages/higher-optim/tests/plugin_dist",  # the higher.optimizers plugin the optim tests use
]
TEST_DEPS = ["pytest>=8", "hypothesis>=6", "build", "tqdm", "scikit-learn", "matplotlib"]


def _interpreter(version: str) -> str:
    """A working `pythonX.Y`: on PATH, else one of pyenv's installs (whose shim may refuse)."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}")):
        return str(candidate)
    return version  # nox reports it missing: an error under CI, never a silent pass


nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_missing_interpreters = True


# Under HIGHER_NOX_PRUNE=1 (set by .ci/run) each session deletes its venv when it ends: the
# matrix venvs hold CUDA builds of torch (about 5 GB each), and CI machines have finite disk.
PRUNE = os.environ.get("HIGHER_NOX_PRUNE") == "1"

SessionFn = Callable[[nox.Session], None]


def _pruned(fn: SessionFn) -> SessionFn:
    """Wrap a session so that, under HIGHER_NOX_PRUNE=1, its venv is removed when it ends."""

    @functools.wraps(fn)
    def wrapper(session: nox.Session) -> None:
        try:
            fn(session)
        finally:
            location = getattr(session.virtualenv, "location", None)
            if PRUNE and location:
                shutil.rmtree(location, ignore_errors=True)

    return wrapper


def _install_workspace(session: nox.Session, torch: str) -> None:
    session.install(f"torch=={torch}", NUMPY_FOR.get(torch, "numpy"))
    # Editable installs of the four distributions: the namespace spans their src/ folders.
    session.install(*[arg for p in PACKAGES for arg in ("-e", f"packages/{p}")])
    session.install(*TEST_DEPS)
    if EXTRA_TEST_INSTALLS:
        session.install("--no-deps", *EXTRA_TEST_INSTALLS)


def _pytest(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pytest", *args, *session.posargs)


def _tests(session: nox.Session, torch: str) -> None:
    _install_workspace(session, torch)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    _pytest(session)


def _make_tests_session(torch: str, name: str, tags: list[str]) -> None:
    @nox.session(name=name, python=_interpreter(TORCH_MATRIX[torch]), tags=tags)
    @_pruned
    def session_fn(session: nox.Session) -> None:
        _tests(session, torch)

    session_fn.__doc__ = f"Run the test suite on torch {torch} (Python {TORCH_MATRIX[torch]})."


_make_tests_session(TORCH_AT_HAND, "tests", tags=["quick"])
for _torch in TORCH_MATRIX:
    _make_tests_session(_torch, f"tests-{_torch}", tags=["ci", "matrix"])


@nox.session(python="3.11", tags=["ci"])
@_pruned
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole workspace."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11", tags=["ci"])
@_pruned
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the four packages, then a smoke file against the installed wheels."""
    _install_workspace(session, TORCH_AT_HAND)
    session.install("mypy==2.4.1", "nox")  # nox: the noxfile is type-checked too
    session.run("mypy", *SRC_DIRS)
    for pkg in PACKAGES:  # one run per test folder: test modules are top-level names
        session.run("mypy", f"packages/{pkg}/tests")
    session.run("mypy", "examples", "benchmarks", "noxfile.py")
    session.run("mypy", "tests/repo")
    # Against installed wheels: a fresh venv holds the built distributions, never the sources.
    wheels = _build_wheels(session)
    smoke = ROOT / "tests" / "typing"
    with _fresh_venv(session, Path(session.create_tmp()) / "typed-wheels") as python:
        pip = [python, "-m", "pip", "install", "-q"]
        session.run(*pip, f"torch=={TORCH_AT_HAND}", external=True)
        session.run(*pip, *wheels.values(), "mypy==2.4.1", external=True)
        # Its own config file: the workspace's mypy_path would point mypy back at the sources.
        config = ["--config-file", str(smoke / "mypy.ini")]
        session.run(python, "-m", "mypy", *config, str(smoke / "smoke.py"), external=True)


def _build_wheels(session: nox.Session) -> dict[str, str]:
    """Build the four wheels with hatch into a fresh folder; return distribution -> wheel path."""
    session.install("hatch")
    out = Path(session.create_tmp()).resolve() / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for pkg in PACKAGES:  # hatch builds the project of the folder it runs in
        with session.chdir(ROOT / "packages" / pkg):
            session.run("hatch", "build", "-t", "wheel", str(out))
    return {p: str(next(out.glob(p.replace("-", "_") + "-*.whl"))) for p in PACKAGES}


def _make_venv(session: nox.Session, path: Path) -> str:
    """A new venv at `path` (any old one there is removed); returns its python."""
    shutil.rmtree(path, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(path), external=True)
    return str(path / "bin" / "python")


@contextlib.contextmanager
def _fresh_venv(session: nox.Session, path: Path) -> Iterator[str]:
    """A new venv at `path` for one block (its python is yielded), deleted when the block ends."""
    try:
        yield _make_venv(session, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@nox.session(python="3.11", tags=["ci"])
@_pruned
def isolation(session: nox.Session) -> None:
    """Install each combination users install into fresh venvs; prove each holds only its own."""
    wheels = _build_wheels(session)
    combos = {
        "patch-only": ["higher-patch"],
        "optim-only": ["higher-optim"],
        "core": ["higher-core"],
        "core-all": ["higher-core[all]"],
    }
    tmp = Path(session.create_tmp()).resolve()
    # pip resolves sibling pins from the folder of freshly built wheels, never from an index.
    links = ["--find-links", str(Path(wheels[PACKAGES[0]]).parent)]
    for combo, reqs in combos.items():
        with _fresh_venv(session, tmp / f"iso-{combo}") as python:
            pip = [python, "-m", "pip", "install", "-q", *links]
            session.run(*pip, f"torch=={TORCH_AT_HAND}", external=True)
            session.run(*pip, *reqs, external=True)
            check = str(ROOT / "tests" / "isolation" / "check.py")
            session.run(python, check, combo, external=True)


@nox.session(python="3.11", tags=["ci"])
@_pruned
def plugin(session: nox.Session) -> None:
    """The example plugin (examples/lion-plugin) as a user installs it: built wheels in a fresh
    venv beside higher-core; then the plugin's own tests (the conformance kit) run there."""
    wheels = Path(_build_wheels(session)[PACKAGES[0]]).parent
    plugin_dir = ROOT / "examples" / "lion-plugin"
    with session.chdir(plugin_dir):
        session.run("hatch", "build", "-t", "wheel", str(wheels))
    venv = Path(session.create_tmp()).resolve() / "plugin-venv"
    with _fresh_venv(session, venv) as python:
        pip = [python, "-m", "pip", "install", "-q"]
        numpy = NUMPY_FOR.get(TORCH_AT_HAND, "numpy")
        session.run(*pip, f"torch=={TORCH_AT_HAND}", numpy, "pytest>=8", external=True)
        # --no-index: every higher distribution and the plugin come from the wheels just built.
        local = ["--no-index", "--find-links", str(wheels)]
        session.run(*pip, *local, "higher-core", "higher-lion[test]", external=True)
        installed = (
            "import sysconfig, higher.optim, higher.contrib, higher_lion\n"
            "site = sysconfig.get_paths()['purelib']\n"
            "for m in (higher.optim, higher.contrib, higher_lion):\n"
            "    assert m.__file__.startswith(site), f'{m.__name__} from {m.__file__}'\n"
        )
        session.run(python, "-c", installed, external=True)
        with session.chdir(plugin_dir):  # the plugin's own pytest configuration
            pytest = [python, "-m", "pytest", "-p", "no:cacheprovider"]
            session.run(*pytest, *session.posargs, external=True)


@nox.session(python="3.11")
@_pruned
def cuda(session: nox.Session) -> None:
    """Run only the tests marked `cuda` (on a machine with a GPU; they skip elsewhere)."""
    _install_workspace(session, os.environ.get("HIGHER_TORCH", TORCH_AT_HAND))
    _pytest(session, "-m", "cuda")


@nox.session(python="3.11")
@_pruned
def bench(session: nox.Session) -> None:
    """Benchmarks: functional-module overhead (plain, torch.func, higher 0.2.1), then the suite
    against the peers (benchmarks/peers.py: higher 0.2.1 and TorchOpt 0.7.3 each in its own
    venv, this project eager, with higher.compile_step, with batched tasks (vmap) and with
    higher.compile_meta_step, hand-written torch.func), and the implicit-differentiation
    benchmarks (benchmarks/implicit.py against TorchOpt, benchmarks/implicit_vs_unroll.py) into
    benchmarks/results/. Arguments after `--`
    go to peers.py (e.g. `nox -s bench -- --rounds 3`, `-- --device cuda`)."""
    _install_workspace(session, TORCH_AT_HAND)
    python = _peer_venvs(session)
    session.run(
        "python", "benchmarks/patch_overhead.py", "--legacy-python", python["legacy-higher"]
    )
    session.run(
        "python",
        "benchmarks/peers.py",
        "--higher-021-python",
        python["legacy-higher"],
        "--torchopt-python",
        python["torchopt"],
        "--compiled",
        "--fast-paths",
        *session.posargs,
    )
    # One implicit hypergradient: higher.implicit vs TorchOpt's custom_root (same TorchOpt venv),
    # then unrolled vs implicit hypergradients on the example's problem.
    session.run("python", "benchmarks/implicit.py", "--torchopt-python", python["torchopt"])
    session.run("python", "benchmarks/implicit_vs_unroll.py")


@nox.session(python="3.11")
@_pruned
def memory(session: nox.Session) -> None:
    """Peak memory and time of one meta-gradient against the number of inner steps, per memory
    mode of innerloop_ctx(..., unroll=), beside higher 0.2.1 and TorchOpt 0.7.3 in their own
    venvs (benchmarks/memory.py) into benchmarks/results/. Arguments after `--` go to
    memory.py (e.g. `nox -s memory -- --max-steps 100`). About half an hour on 2 busy CPU cores."""
    _install_workspace(session, TORCH_AT_HAND)
    python = _peer_venvs(session)
    session.run(
        "python",
        "benchmarks/memory.py",
        "--higher-021-python",
        python["legacy-higher"],
        "--torchopt-python",
        python["torchopt"],
        *session.posargs,
    )


def _peer_venvs(session: nox.Session) -> dict[str, str]:
    """The peers' venvs (higher 0.2.1, TorchOpt 0.7.3, each beside the torch at hand), made
    once; name -> its python."""
    tmp = Path(session.create_tmp()).resolve()
    peers = {"legacy-higher": "higher==0.2.1", "torchopt": "torchopt==0.7.3"}
    python = {}
    for name, requirement in peers.items():
        venv = tmp / name
        python[name] = str(venv / "bin" / "python")
        if not Path(python[name]).exists():
            _make_venv(session, venv)
        # torch first: the wheel at hand, never a CUDA download chosen by the peer's pins
        pip = [python[name], "-m", "pip", "install", "-q"]
        session.run(*pip, f"torch=={TORCH_AT_HAND}", "numpy", external=True)
        no_deps = ["--no-deps"] if name == "legacy-higher" else []
        session.run(*pip, *no_deps, requirement, external=True)
    return python


@nox.session(name="bench-optim", python="3.11")
@_pruned
def bench_optim(session: nox.Session) -> None:
    """A differentiable Adam unroll: higher.optim vs a per-tensor loop vs TorchOpt (own venv)."""
    _install_workspace(session, TORCH_AT_HAND)
    tmp = Path(session.create_tmp()).resolve()
    other = _make_venv(session, tmp / "torchopt")
    # torch first, so the CPU wheel at hand is used, then TorchOpt beside it
    session.run(other, "-m", "pip", "install", "-q", f"torch=={TORCH_AT_HAND}", external=True)
    session.run(other, "-m", "pip", "install", "-q", "torchopt==0.7.3", external=True)
    session.run("python", "benchmarks/optim_step.py", "--torchopt-python", other, *session.posargs)


@nox.session(python="3.11", tags=["ci"])
@_pruned
def repo(session: nox.Session) -> None:
    """Repository-level tests (tests/repo: READMEs, examples, benchmark smokes), once, on the
    torch at hand: they check the documents and scripts, not the library across torch versions."""
    _install_workspace(session, TORCH_AT_HAND)
    _pytest(session, "tests/repo")


# The documentation site's tools; the API reference is read from the sources (no torch needed).
DOCS_DEPS = ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8"]


@nox.session(python="3.11", tags=["ci"])
@_pruned
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (every warning an error) into site/, then check it
    (tests/docs: every public name has an anchor, no private one shows); `nox -s docs -- serve`
    serves it at http://127.0.0.1:8000 instead. Its code blocks run in `repo`."""
    session.install(*DOCS_DEPS, "pytest>=8")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict")
    else:
        session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
        # --noconftest: the root conftest.py imports torch, which this session does not install.
        session.run(
            "python", "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "tests/docs"
        )


@nox.session(python="3.11")
@_pruned
def demo(session: nox.Session) -> None:
    """Few-shot MAML on scikit-learn's digits (examples/maml_digits.py); shrunk under CI."""
    _install_workspace(session, TORCH_AT_HAND)
    smoke = ["--smoke"] if os.environ.get("CI") else []
    session.run("python", "examples/maml_digits.py", *smoke, *session.posargs)
