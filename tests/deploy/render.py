"""Renders deploy/ with kustomize and asks the built binary for its --help. Shared by this folder.

kustomize: `kubectl kustomize` when kubectl is on PATH, else a standalone `kustomize build`; set
IMDS_BROKER_KUSTOMIZE (e.g. "kustomize build") to choose. The binary: IMDS_BROKER_BIN, else the dev
build target/debug/imds-broker (tests/run.sh builds it before this step). Neither missing is a skip.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from functools import cache
from pathlib import Path

import yaml

from checks import Help

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(os.environ.get("IMDS_BROKER_BIN", ROOT / "target" / "debug" / "imds-broker"))

# The subcommands whose --help the manifests are checked against.
SUBCOMMANDS = [(), ("iptables", "reconcile"), ("iptables", "uninstall"), ("oidc", "export")]


def kustomize_argv() -> list[str]:
    if os.environ.get("IMDS_BROKER_KUSTOMIZE"):
        return shlex.split(os.environ["IMDS_BROKER_KUSTOMIZE"])
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise RuntimeError("neither kubectl nor kustomize is on PATH (tests/run.sh needs one)")


def render(directory: Path) -> list[dict]:
    result = subprocess.run(
        [*kustomize_argv(), str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize {directory} failed: {result.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert docs, f"kustomize {directory} rendered nothing"
    return docs


@cache
def render_dir(relative: str) -> tuple:
    """deploy/<relative> rendered (cached; callers must not change the documents: deep-copy first)."""
    return tuple(render(DEPLOY / relative))


@cache
def render_composed(resources: tuple[str, ...], components: tuple[str, ...], patches: tuple[str, ...] = ()) -> tuple:
    """A kustomization of deploy/<resources> and deploy/<components>, with inline patches, rendered
    (cached, as render_dir)."""
    with tempfile.TemporaryDirectory(prefix="imds-broker-kustomize-") as tmp:
        workdir = Path(tmp)
        rel = lambda p: os.path.relpath(DEPLOY / p, workdir)  # noqa: E731 (kustomize wants relative paths)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(r) for r in resources],
            "components": [rel(c) for c in components],
            "patches": [{"patch": p} for p in patches],
        }
        (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return tuple(render(workdir))


@cache
def help_text(words: tuple[str, ...]) -> str:
    if not os.access(BIN, os.X_OK):
        raise AssertionError(f"{BIN} is missing: build it first (cargo build --bins)")
    result = subprocess.run([str(BIN), *words, "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, f"{BIN} {' '.join(words)} --help: {result.stderr}"
    return result.stdout


def helps() -> dict[tuple[str, ...], Help]:
    return {words: Help.parse(help_text(words)) for words in SUBCOMMANDS}


def cargo_version() -> str:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]
