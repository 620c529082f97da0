"""Fixtures shared by the suite.

Parity tests need the real qemu-img. When INSTAR_REQUIRE_QEMU=1 (as in CI and
``make test``) a missing qemu-img fails those tests instead of skipping them.
"""

from __future__ import annotations

import os

import pytest

from helpers import QEMU_IMG, QEMU_IO


def _need(tool: str | None, name: str) -> str:
    if tool is None:
        message = f"{name} is not installed (apt-get install qemu-utils)"
        if os.environ.get("INSTAR_REQUIRE_QEMU") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return tool


@pytest.fixture
def qemu_img() -> str:
    """Path of the reference qemu-img; fails (CI) or skips (by hand) when missing."""
    return _need(QEMU_IMG, "qemu-img")


@pytest.fixture
def qemu_io_tool() -> str:
    return _need(QEMU_IO, "qemu-io")
