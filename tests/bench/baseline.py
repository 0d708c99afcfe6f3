"""An earlier commit of the relay, checked out to run beside today's: its `relay worker`
for the A/B end-to-end benchmark (tests.bench.ab).

The commit's tree is exported (`git archive`) to `bench-results/baseline-<sha>/`, kept
between runs. It runs on this project's interpreter when its entry points import there
(its dependencies are a subset of today's, at versions it accepts); otherwise it gets a
virtualenv of its own in that directory with its own dependencies installed.

Its processes start in its directory with it first on PYTHONPATH: `python -m` puts the
working directory first on sys.path, ahead of this checkout's editable install, so the
baseline's `relay` and `workers` packages are the ones imported (the start-up log says
which, see `start_worker`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests import procs
from tests.bench import harness
from tests.bench.harness import say


@dataclass(frozen=True)
class Baseline:
    """A checked-out commit: where it is, the interpreter it runs on, its CLI module."""

    ref: str
    sha: str
    root: Path
    python: str
    cli_module: str
    own_venv: bool


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, check=True).stdout


def _export(sha: str, into: Path) -> None:
    partial = into.with_name(into.name + ".partial")
    if partial.exists():
        subprocess.run(["rm", "-rf", str(partial)], check=True)
    partial.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_git("archive", sha)), mode="r:") as tar:
        tar.extractall(partial, filter="data")
    partial.rename(into)


def _cli_module(root: Path) -> str:
    """The module of the `relay` console script in the commit's pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    return str(project["project"]["scripts"]["relay"]).split(":", 1)[0]


def _imports(python: str, root: Path, cli_module: str) -> str:
    """'' if the commit's CLI and Celery app import on `python`, else the error."""
    check = (
        f"import {cli_module}, workers.app, relay, sys; "
        f"assert relay.__file__.startswith({str(root)!r}), relay.__file__"
    )
    result = subprocess.run(
        [python, "-c", check], cwd=root, env=_env(root, harness.relay_env("redis://127.0.0.1/0")),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return "" if result.returncode == 0 else result.stderr.strip().splitlines()[-1]


def _env(root: Path, env: dict[str, str]) -> dict[str, str]:
    return {**env, "PYTHONPATH": str(root)}


def prepare(ref: str) -> Baseline:
    """`ref` checked out under bench-results/ and ready to run."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()
    root = harness.RESULTS / f"baseline-{sha[:12]}"
    if not root.exists():
        say(f"  exporting {ref} ({sha[:12]}) to {root.relative_to(procs.ROOT)}")
        _export(sha, root)
    cli_module = _cli_module(root)
    error = _imports(sys.executable, root, cli_module)
    if not error:
        return Baseline(ref, sha, root, sys.executable, cli_module, own_venv=False)
    say(f"  {ref} does not import on this venv ({error}): installing it into its own")
    venv = root / ".venv"
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", str(root)], check=True)
    error = _imports(python, root, cli_module)
    if error:
        raise RuntimeError(f"{ref} does not import even in its own venv: {error}")
    return Baseline(ref, sha, root, python, cli_module, own_venv=True)


def start_worker(
    children: procs.Children, baseline: Baseline, redis_url: str, sandbox_url: str, label: str
) -> procs.Proc:
    """The baseline's `relay worker`, with the arguments and settings
    harness.start_relay_worker gives today's."""
    env = harness.relay_env(redis_url, churnzero_url=sandbox_url + "/i", log_level="WARNING")
    name = f"bench-{label}-{os.getpid()}@%h"
    # `cd` first: procs starts every child in this checkout, whose packages would win.
    return children.start(
        label,
        ["sh", "-c", 'cd "$0" && exec "$@"', str(baseline.root), baseline.python, "-m",
         baseline.cli_module, "worker", "-c", "4", "--without-heartbeat", "-n", name],
        _env(baseline.root, env),
    )  # fmt: skip
