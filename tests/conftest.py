"""Fixtures shared by the suite.

Parity tests need the real qemu-img. When INSTAR_REQUIRE_QEMU=1 (as in CI and
``make test``) a missing qemu-img fails those tests instead of skipping them.
"""

from __future__ import annotations

import pytest

from helpers import qemu_img_path, qemu_io_path


@pytest.fixture
def qemu_img() -> str:
    """Path of the reference qemu-img; fails (CI) or skips (by hand) when missing."""
    return qemu_img_path()


@pytest.fixture
def qemu_io_tool() -> str:
    return qemu_io_path()
