"""Corrupted images never crash instar: a one-line error and exit 1, or a clean copy.

Small valid images of every format (made by qemu-img, or by the reader tests'
builders for the formats qemu cannot write) get bytes of their
metadata overwritten at random (fixed seeds, so failures reproduce); `instar
dd` and `instar info` on each must either succeed or fail with exit 1 and one
line, never raise (a traceback) and never leave an output file on failure.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

import test_bochs as bochs_tests
import test_cloop as cloop_tests
import test_dmg as dmg_tests
from helpers import pattern, qemu_img_ok, qemu_io, require_qemu, run_instar

# (format, qemu-img create/convert options)
SOURCES = [
    ("qcow2", []), ("qcow2", ["-o", "compat=0.10"]), ("qcow2", ["-c"]),
    ("qcow2", ["-o", "extended_l2=on"]), ("vmdk", []),
    ("vmdk", ["-o", "subformat=streamOptimized"]), ("vpc", []), ("vhdx", []),
    ("vdi", []), ("vdi", ["-o", "static=on"]), ("qed", []), ("qed", ["-o", "cluster_size=4k"]),
    ("qcow", []),
]
MUTATIONS = 60
# Formats qemu-img cannot make, built by their reader tests (format, builder).
BUILT: list[tuple[str, Callable[[], bytes]]] = [
    ("dmg", lambda: dmg_tests.Dmg(dmg_tests.every_kind("zlib")).build()),
    ("dmg", lambda: dmg_tests.Dmg(dmg_tests.every_kind("raw"), form="rsrc").build()),
    ("bochs", lambda: bochs_tests.IMAGES["mixed.bochs"].build()),
    ("cloop", lambda: cloop_tests.cloop_bytes(pattern(300_000, seed=4), 64 << 10)),
]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require_qemu()
    directory = tmp_path_factory.mktemp("fuzz")
    raw = directory / "source.raw"
    raw.write_bytes(pattern(1 << 20) + bytes(1 << 20) + pattern(300_000, seed=4))
    made = []
    for index, (fmt, options) in enumerate(SOURCES):
        image = directory / f"source{index}.{fmt}"
        qemu_img_ok("convert", "-f", "raw", "-O", fmt, *options, str(raw), str(image))
        if fmt in ("qcow2", "qed") and not options:
            qemu_io(image, "write -z 64k 64k", fmt)
        made.append(image)
    for index, (fmt, build) in enumerate(BUILT, len(SOURCES)):
        image = directory / f"source{index}.{fmt}"
        image.write_bytes(build())
        made.append(image)
    return made


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a few bytes, mostly in headers and tables: the first KiB holds every
    format's header, the next 256 KiB its tables, the last 4 KiB vpc/vmdk footers."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        region = rng.random()
        if region < 0.5:
            position = rng.randrange(min(len(buffer), 1024))
        elif region < 0.75:
            position = rng.randrange(min(len(buffer), 256 << 10))
        elif region < 0.9:
            position = len(buffer) - 1 - rng.randrange(min(len(buffer), 4096))
        else:
            position = rng.randrange(len(buffer))
        buffer[position] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(buffer)


NAMES = ["-".join([fmt, *options]) for fmt, options in SOURCES] + [
    f"{fmt}-built-{i}" for i, (fmt, _) in enumerate(BUILT)]


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES.__getitem__)
def test_mutated_images_fail_cleanly(index: int, originals: list[Path], tmp_path: Path) -> None:
    original = originals[index].read_bytes()
    fmt = originals[index].suffix[1:]
    rng = random.Random(index)
    refused = 0
    for attempt in range(MUTATIONS):
        victim = tmp_path / f"victim.{fmt}"
        victim.write_bytes(_mutate(original, rng))
        out = tmp_path / "out.raw"
        for args in (["dd", "-f", fmt, "bs=1M", f"if={victim}", f"of={out}"],
                     ["info", "-f", fmt, str(victim)]):
            result = run_instar(*args)  # an exception here is a crash: the test fails
            assert result.rc in (0, 1), (attempt, args, result)
            if result.rc == 1:
                refused += 1
                # One error line; qemu follows a few errors with one hint line
                # (snapshot tables: "You can force-remove ...").
                lines = result.stderr.strip().splitlines()
                assert lines[0].startswith("instar: "), (attempt, args, result.stderr)
                assert len(lines) == 1 or (len(lines) == 2 and "instar" not in lines[1]
                                           and "Traceback" not in lines[1]), (attempt, args,
                                                                            result.stderr)
                assert not out.exists() or args[0] == "info"
        out.unlink(missing_ok=True)
    assert refused >= 2, f"only {refused} runs refused: the mutations miss the metadata"


def test_control_characters_from_an_image_are_escaped(tmp_path: Path) -> None:
    """An image cannot forge lines or send terminal escapes through an error message."""
    descriptor = tmp_path / "evil.vmdk"
    descriptor.write_bytes(
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        b'createType="mono\x1b[31mlithic\x0cFlat\xff"\n\nRW 8 FLAT "x.bin" 0\n'
    )
    result = run_instar("info", str(descriptor))
    assert result.rc == 1
    assert result.stderr.count("\n") == 1 and len(result.stderr.splitlines()) == 1
    assert "\x1b" not in result.stderr and "\\x1b[31m" in result.stderr
    assert "\\x0c" in result.stderr and "\\xff" in result.stderr
