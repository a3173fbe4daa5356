"""Sessions for the `higher` workspace.

Quick loop (torch 2.13.0, the CPU wheel at hand):   nox -s tests
One torch of the matrix:                            nox -s tests-2.1.2
The five wheels and sdists, checked, into dist/:     nox -s build
Everything CI runs:                                  nox -t ci
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shlex
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
    "examples/learned-optimizer",
    "packages/higher-optim/tests/plugin_dist",  # the higher.optimizers plugin the optim tests use
]
TEST_DEPS = [
    "pytest>=8",
    "pytest-xdist",
    "hypothesis>=6",
    "build",
    "tqdm",
    "scikit-learn",
    "matplotlib",
]
# Two pytest workers (CI machines have two cores), each test file on one: a file's tests may
# build on each other (a page's code blocks do), files do not. `-- -n 0` runs in one process.
PARALLEL = ("-n", "2", "--dist", "loadfile")


def _interpreter(version: str) -> str:
    """A working `pythonX.Y`: on PATH, else one of pyenv's installs (whose shim may refuse)."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}")):
        return str(candidate)
    return version  # nox reports it missing: an error under CI, never a silent pass


nox.options.default_venv_backend = "venv"
# nox looks for uv before it makes any venv, whatever the backend, and logs "uv binary not found."
# where there is none. The sessions use venv and pip on purpose (pip reads the machine's pip
# configuration: its local wheels, its index), so the finding is noise; drop only that line.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")
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


# The two-process launches run alone, after the rest, so their ranks do not wait on a core.
# (Their hangs on torch 2.1.2 under load were in destroy_process_group after the results were
# saved; the workers no longer call it.)
PROCESS_TESTS = (
    "packages/higher-core/tests/test_core_distributed.py",
    "packages/higher-core/tests/test_core_composition.py",
)


def _tests(session: nox.Session, torch: str) -> None:
    _install_workspace(session, torch)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    _pytest(session, *PARALLEL, *(f"--ignore={path}" for path in PROCESS_TESTS))
    _pytest(session, *PROCESS_TESTS)


def _repo_tests(session: nox.Session) -> None:
    _pytest(session, *PARALLEL, "tests/repo")


def _make_tests_session(torch: str, name: str, tags: list[str], repo: bool = False) -> None:
    @nox.session(name=name, python=_interpreter(TORCH_MATRIX[torch]), tags=tags)
    @_pruned
    def session_fn(session: nox.Session) -> None:
        _tests(session, torch)
        if repo:
            _repo_tests(session)

    session_fn.__doc__ = f"Run the test suite on torch {torch} (Python {TORCH_MATRIX[torch]})." + (
        " Then the repository tests, as `nox -s repo` runs them (CI's one run of them, in a venv"
        " that already holds the workspace)."
        if repo
        else ""
    )


_make_tests_session(TORCH_AT_HAND, "tests", tags=["quick"])
for _torch in TORCH_MATRIX:
    _make_tests_session(_torch, f"tests-{_torch}", ["ci", "matrix"], repo=_torch == TORCH_AT_HAND)


@nox.session(python="3.11", tags=["ci"])
@_pruned
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole workspace."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


DIST = ROOT / "dist"  # what `nox -s build` makes; isolation and plugin install from it
VERSION_FILE = ROOT / "packages" / "higher-core" / "src" / "higher" / "__init__.py"
BUILD_DEPS = ["build", "hatchling>=1.27"]


@nox.session(python="3.11", tags=["ci"])
@_pruned
def build(session: nox.Session) -> None:
    """Build the five wheels and sdists into dist/ (each wheel from its sdist), then check them:
    twine's README rendering, one version for all, exact sibling pins, the licence."""
    _build_dists(session)


def _build_dists(session: nox.Session) -> Path:
    """Build the five wheels and sdists into DIST (replacing any there), and check them."""
    session.install(*BUILD_DEPS, "twine")
    for old in DIST.glob("higher_*"):
        old.unlink()
    for pkg in PACKAGES:  # without isolation: the session's hatchling, no venv per build
        session.run("python", "-m", "build", "-n", "-q", "-o", str(DIST), f"packages/{pkg}")
    session.run("twine", "check", "--strict", *sorted(str(p) for p in DIST.glob("higher_*")))
    session.run("python", str(ROOT / "tests" / "isolation" / "check_dists.py"), str(DIST))
    return DIST


def _dists(session: nox.Session) -> Path:
    """dist/ as `nox -s build` left it; built and checked here first where it is missing or older
    than any file of the packages (so CI builds once, and no session installs stale wheels)."""
    built = [p for p in DIST.glob("higher_*") if p.name.endswith((".whl", ".tar.gz"))]
    sources = [
        f
        for pkg in PACKAGES
        for f in (ROOT / "packages" / pkg).rglob("*")
        if f.is_file() and not any(part.startswith((".", "__pycache__")) for part in f.parts)
    ]
    fresh = len(built) == 2 * len(PACKAGES) and max(f.stat().st_mtime for f in sources) < min(
        p.stat().st_mtime for p in built
    )
    return DIST if fresh else _build_dists(session)


@nox.session(python=False)
def bump(session: nox.Session) -> None:
    """Set the one version of the five distributions: `nox -s bump -- 0.4.0` rewrites
    `__version__` in higher-core's src/higher/__init__.py (every distribution reads it) and each
    exact sibling pin in packages/*/pyproject.toml. The release procedure: docs/contributing.md."""
    new = session.posargs[0] if len(session.posargs) == 1 else ""
    if not re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", new):
        session.error(f"give one version, X.Y.Z (or X.Y.ZrcN): nox -s bump -- 0.4.0; got {new!r}")
    text, found = re.subn(
        r'^__version__ = "[^"]*"$', f'__version__ = "{new}"', VERSION_FILE.read_text(), flags=re.M
    )
    if found != 1:
        session.error(f'{VERSION_FILE} must hold one `__version__ = "..."` line')
    VERSION_FILE.write_text(text)
    for pkg in PACKAGES:
        pyproject = ROOT / "packages" / pkg / "pyproject.toml"
        names = "|".join(re.escape(p) for p in PACKAGES)
        pins = re.sub(rf'"({names})==[^";]*', rf'"\1=={new}', pyproject.read_text())
        pyproject.write_text(pins)
    session.log(f"version {new}: {VERSION_FILE.relative_to(ROOT)} and every sibling pin")


@nox.session(python="3.11", tags=["ci"])
@_pruned
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the five packages, their tests, examples, benchmarks, tests/repo and
    this file (the same check against the installed wheels runs in `isolation`)."""
    _install_workspace(session, TORCH_AT_HAND)
    session.install("mypy==2.4.1", "nox")  # nox: the noxfile is type-checked too
    session.run("mypy", *SRC_DIRS)
    for pkg in PACKAGES:  # one run per test folder: test modules are top-level names
        session.run("mypy", f"packages/{pkg}/tests")
    session.run("mypy", "examples", "benchmarks", "noxfile.py")
    session.run("mypy", "tests/repo", "tests/isolation", "tests/docs")


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
    """README's install-from-a-checkout commands, each run as written in a fresh venv holding
    torch and numpy, against dist/; then each venv is checked to hold only what it installed,
    and the full one type-checks a smoke file against the installed wheels (not the sources)."""
    _dists(session)
    tmp = Path(session.create_tmp()).resolve()
    check = str(ROOT / "tests" / "isolation" / "check.py")
    lines = session.run("python", check, "--readme", silent=True)
    # torch and numpy installed once, in a venv of their own that each checkout venv reads
    # through a .pth file: the venvs start as a user's venv holding torch does, without
    # unpacking torch five times (half a minute each).
    with _fresh_venv(session, tmp / "torch-base") as base:
        numpy = NUMPY_FOR.get(TORCH_AT_HAND, "numpy")
        session.run(
            base, "-m", "pip", "install", "-q", f"torch=={TORCH_AT_HAND}", numpy, external=True
        )
        for i, line in enumerate(str(lines).splitlines()):
            _checkout_line(session, tmp / f"checkout-{i}", line, _purelib(session, base), check)


def _purelib(session: nox.Session, python: str) -> str:
    """The site-packages folder of the venv whose python is `python`."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return str(session.run(python, "-c", code, external=True, silent=True)).strip()


def _checkout_line(session: nox.Session, venv: Path, line: str, torch_lib: str, check: str) -> None:
    """Run one README install line in a fresh venv that sees torch (at `torch_lib`), then check
    that the venv holds what the line installs and no more."""
    requirement = shlex.split(line, comments=True)[-1]  # what the line installs
    with _fresh_venv(session, venv) as python:
        (Path(_purelib(session, python)) / "torch-base.pth").write_text(torch_lib + "\n")
        # As a user runs it: in the activated venv, from the repository root.
        activated = f". {shlex.quote(str(venv / 'bin' / 'activate'))} && {line}"
        session.run("bash", "-c", activated, external=True)
        # The line kept the torch installed before it.
        kept = f"import torch; assert torch.__version__.startswith('{TORCH_AT_HAND}')"
        session.run(python, "-c", kept, external=True)
        session.run(python, check, requirement, external=True)
        if requirement == "higher-core[all]":
            _typed_wheels(session, python)


def _typed_wheels(session: nox.Session, python: str) -> None:
    """mypy --strict on tests/typing/smoke.py against the wheels installed beside `python`."""
    session.run(python, "-m", "pip", "install", "-q", "mypy==2.4.1", external=True)
    smoke = ROOT / "tests" / "typing"
    # Its own config file: the workspace's mypy_path would point mypy back at the sources.
    config = ["--config-file", str(smoke / "mypy.ini")]
    session.run(python, "-m", "mypy", *config, str(smoke / "smoke.py"), external=True)


@nox.session(python="3.11", tags=["ci"])
@_pruned
def plugin(session: nox.Session) -> None:
    """The example plugin (examples/lion-plugin) as a user installs it: its wheel and dist/'s in
    a fresh venv beside higher-core; then the plugin's own tests (the conformance kit) run there."""
    dist = _dists(session)
    session.install(*BUILD_DEPS)
    tmp = Path(session.create_tmp()).resolve()
    plugin_dir = ROOT / "examples" / "lion-plugin"
    session.run(
        "python", "-m", "build", "-n", "-q", "-w", "-o", str(tmp / "plugin"), str(plugin_dir)
    )
    with _fresh_venv(session, tmp / "plugin-venv") as python:
        pip = [python, "-m", "pip", "install", "-q"]
        numpy = NUMPY_FOR.get(TORCH_AT_HAND, "numpy")
        session.run(*pip, f"torch=={TORCH_AT_HAND}", numpy, "pytest>=8", external=True)
        # --no-index: every higher distribution and the plugin come from the wheels just built.
        local = ["--no-index", "--find-links", str(dist), "--find-links", str(tmp / "plugin")]
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


@nox.session(python="3.11")
@_pruned
def repo(session: nox.Session) -> None:
    """Repository-level tests (tests/repo: READMEs, examples, benchmark smokes), once, on the
    torch at hand: they check the documents and scripts, not the library across torch versions.
    CI runs them in the matrix session of that torch, after its suite, in the same venv."""
    _install_workspace(session, TORCH_AT_HAND)
    _repo_tests(session)


# The documentation site's tools; the API reference is read from the sources (no torch needed).
# Ruff is there because mkdocstrings formats the signatures it shows with it.
DOCS_DEPS = [
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.2",
    "mkdocstrings[python]==1.0.8",
    "ruff==0.17.6",
]


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
    # What the demo imports, and no more: higher (core, patch, optim, errors) and its plotting.
    session.install(f"torch=={TORCH_AT_HAND}", NUMPY_FOR.get(TORCH_AT_HAND, "numpy"))
    session.install(
        *[arg for p in PACKAGES if p != "higher-contrib" for arg in ("-e", f"packages/{p}")]
    )
    session.install("scikit-learn", "matplotlib", "tqdm")
    smoke = ["--smoke"] if os.environ.get("CI") else []
    session.run("python", "examples/maml_digits.py", *smoke, *session.posargs)
