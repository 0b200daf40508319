"""pytest wiring for the end-to-end suite: one node (namespaces, kube double, moto, agent) for the whole
session, torn down even when a test fails, and the SDK matrix printed at the end."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def node():
    with harness.Node(prefix="imdsb", octet=0) as node:
        yield node


@pytest.fixture(scope="session")
def versions():
    return harness.sdk_versions()


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("the end-to-end suite needs root (network namespaces, iptables)")


def pytest_terminal_summary(terminalreporter):
    if not harness.MATRIX:
        return
    terminalreporter.section("SDK matrix")
    terminalreporter.write_line(harness.format_matrix(harness.MATRIX))
    failed = sum(not row.passed for row in harness.MATRIX)
    terminalreporter.write_line(f"\n{len(harness.MATRIX) - failed} of {len(harness.MATRIX)} matrix rows passed")
