"""``instar amend`` against ``qemu-img amend`` (7.2) for the external data
file options, several changes in one command (``refcount_bits`` with
``compat``, ``lazy_refcounts``, ``size``, ``data_file``; ``size`` with
``compat``) and the encryption options: the same command line on copies of
one image, the same stdout, stderr and exit status, then the same image
(the whole file byte for byte where qemu's result is deterministic, else
``qemu-img info``, ``check`` and ``compare``). Refusals leave instar's copy
unchanged; a crash at every write leaves an image qemu-img reads as one of
the states qemu's steps pass through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import qemu_img_ok, qemu_io, run_instar, run_qemu_img, stopped_runs
from test_amend import Pair

pytestmark = pytest.mark.usefixtures("allow_own_directories")

_DATA = ("write -P 1 0 64k", "write -P 2 3M 200k")


def _same_file(pair: Pair) -> None:
    """instar's image is qemu's, byte for byte."""
    ours = (pair.our_dir / pair.name).read_bytes()
    assert ours == (pair.qemu_dir / pair.name).read_bytes()


def _same_header(pair: Pair) -> None:
    """instar's first cluster is qemu's (a new refcount width leaves the old
    structure's freed clusters with different garbage: qemu counts its new
    blocks in the old structure first)."""
    cluster = 1 << (pair.qemu_dir / pair.name).read_bytes()[20:24][-1]
    ours = (pair.our_dir / pair.name).read_bytes()[:cluster]
    assert ours == (pair.qemu_dir / pair.name).read_bytes()[:cluster]


def _checked(pair: Pair) -> None:
    """Both clean for ``qemu-img check`` (run beside the image: qemu opens a
    relative data file name from the current directory), the data files equal."""
    for directory in (pair.qemu_dir, pair.our_dir):
        checked = run_qemu_img("check", pair.name, cwd=directory)
        assert checked.rc == 0 and "No errors were found" in checked.stdout, checked
    assert (pair.our_dir / "d.raw").read_bytes() == (pair.qemu_dir / "d.raw").read_bytes()


# --- data_file and data_file_raw -------------------------------------------------------------


@pytest.mark.parametrize("create", ["data_file=d.raw", "data_file=d.raw,data_file_raw=on"])
@pytest.mark.parametrize("option", [
    "data_file=e.raw", "data_file=", "data_file=d.raw", "data_file_raw=off",
    "data_file_raw=on", "data_file=e.raw,data_file_raw=off", "data_file=e.raw,data_file_raw=on",
    "data_file=a-much-longer-name-for-the-external-data-file-of-this-image.raw",
    "data_file=e.raw,lazy_refcounts=on", "data_file_raw=off,refcount_bits=64",
    "data_file=,,odd,,name", "data_file=" + "x" * 600, "data_file=d.raw,compat=0.10",
])
def test_data_file_options_like_qemu(create: str, option: str, tmp_path: Path) -> None:
    """The header as qemu rewrites it (the data file extension renamed,
    dropped or kept, the raw bit cleared): the whole file equal to qemu's.
    The new data file is not opened (qemu does not open it either)."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA)
    qemu = pair.both("-o", option, pair.name)
    (_same_header if "refcount_bits" in option else _same_file)(pair)
    if qemu.rc == 0 and ("data_file=" not in option or "data_file=d.raw" in option):
        _checked(pair)


@pytest.mark.parametrize("option", ["data_file=" + "x" * 300, "data_file=" + "x" * 400,
                                    "data_file=e.raw,lazy_refcounts=on"])
def test_data_file_names_in_small_clusters(option: str, tmp_path: Path) -> None:
    """A name that does not fit in a 512-byte first cluster: qemu's header
    update fails (with no space), and instar's, before it writes anything."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", "data_file=d.raw,cluster_size=512", pair.name, "8M",
              writes=_DATA)
    pair.both("-o", option, pair.name)
    _same_file(pair)


def test_data_file_refusals_leave_qemus_partial_writes_out(tmp_path: Path) -> None:
    """qemu writes the new data file name, then refuses the downgrade (or the
    backing file); instar refuses first, with qemu's words, and writes nothing."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", "data_file=d.raw", pair.name, "8M", writes=_DATA)
    original = (pair.our_dir / pair.name).read_bytes()
    for option in ("data_file=e.raw,compat=0.10", "data_file=e.raw,backing_file=b.qcow2"):
        assert pair.both("-o", option, pair.name).rc == 1
        info = json.loads(qemu_img_ok("info", "--output=json", pair.name, cwd=pair.qemu_dir))
        assert info["format-specific"]["data"]["data-file"] == "e.raw"
        assert (pair.our_dir / pair.name).read_bytes() == original
        shutil.copyfile(pair.our_dir / pair.name, pair.qemu_dir / pair.name)


def test_data_file_after_rename_reads_the_same(tmp_path: Path) -> None:
    """Renamed to a copy of the data file: both images read as before."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", "data_file=d.raw", pair.name, "8M", writes=_DATA)
    for directory in (pair.qemu_dir, pair.our_dir):
        shutil.copyfile(directory / "d.raw", directory / "e.raw")
    assert pair.both("-o", "data_file=e.raw", pair.name).rc == 0
    _same_file(pair)
    _checked(pair)
    qemu_img_ok("convert", "-O", "raw", pair.name, "out.raw", cwd=pair.our_dir)
    assert (pair.our_dir / "out.raw").read_bytes()[:65536] == b"\1" * 65536


@pytest.mark.parametrize("option", ["data_file=e.raw", "data_file_raw=on", "data_file=",
                                    "data_file_raw=off"])
def test_data_file_on_images_without_one(option: str, tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", pair.name, "8M", writes=_DATA)
    pair.both("-o", option, pair.name)
    _same_file(pair)


# --- several changes in one command ----------------------------------------------------------


@pytest.mark.parametrize("create,option", [
    ("compat=0.10", "compat=1.1,refcount_bits=64"),
    ("compat=0.10", "compat=1.1,refcount_bits=2,lazy_refcounts=on"),
    ("compat=1.1,refcount_bits=64", "compat=0.10,refcount_bits=16"),
    ("compat=1.1,refcount_bits=64,lazy_refcounts=on", "compat=0.10,refcount_bits=16"),
    ("compat=1.1", "refcount_bits=64,lazy_refcounts=on"),
    ("compat=1.1,lazy_refcounts=on", "refcount_bits=1,lazy_refcounts=off"),
    ("compat=1.1", "refcount_bits=8,size=16M"),
    ("compat=1.1", "refcount_bits=8,size=2M"),
    ("compat=1.1,cluster_size=4k", "refcount_bits=4,size=1G,lazy_refcounts=on"),
    ("compat=1.1,cluster_size=512", "refcount_bits=64,size=4M"),
    ("compat=0.10", "compat=1.1,size=16M"),
    ("compat=1.1", "compat=0.10,size=16M"),
    ("compat=1.1", "compat=0.10,size=2M"),
    ("compat=1.1,refcount_bits=64", "compat=0.10,refcount_bits=16,size=4M"),
    ("compat=1.1", "refcount_bits=16,lazy_refcounts=on"),
    ("compat=1.1", "refcount_bits=64,compat=0.10"),
    ("compat=1.1", "refcount_bits=64,lazy_refcounts=maybe"),
    ("compat=1.1", "refcount_bits=64,compat=0.10,lazy_refcounts=on"),
    ("data_file=d.raw", "refcount_bits=64,lazy_refcounts=on,data_file=e.raw"),
    ("data_file=d.raw,data_file_raw=on", "refcount_bits=1,data_file_raw=off"),
])
def test_several_changes_like_qemu(create: str, option: str, tmp_path: Path) -> None:
    """qemu's order (upgrade, refcount width, data file, lazy refcounts,
    size, downgrade): the same messages, info, data, and clean."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA)
    qemu = pair.both("-o", option, pair.name)
    if "data_file" not in create:
        pair.assert_same()
    elif "data_file=" not in option:
        _checked(pair)
    if qemu.rc == 0 and "size" not in option:
        # (a new L1 table goes where qemu's allocator finds room: after a
        # width change, qemu reuses the old structure's clusters, instar's
        # resize places it at the end of the file)
        _same_header(pair)


@pytest.mark.parametrize("create,option", [
    ("compat=0.10", "compat=1.1,size=16M"), ("compat=0.10", "compat=1.1,refcount_bits=64"),
    ("compat=1.1,refcount_bits=64", "refcount_bits=16,compat=0.10"),
])
def test_several_changes_with_a_snapshot(create: str, option: str, tmp_path: Path) -> None:
    """A v2 image with a snapshot is upgraded before it is resized (qemu
    refuses to resize a v2 image with snapshots), so both together work."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA, snapshot=True)
    assert pair.both("-o", option, pair.name).rc == 0
    pair.assert_same()


@pytest.mark.parametrize("create,option,qemu_changed", [
    ("compat=0.10", "compat=1.1,refcount_bits=1", "compat"),
    ("compat=1.1", "refcount_bits=64,size=1000", "refcount-bits"),
    ("compat=1.1", "lazy_refcounts=on,size=1000", "lazy-refcounts"),
    ("compat=1.1,refcount_bits=64", "refcount_bits=16,compat=0.10,size=16M", "refcount-bits"),
])
def test_qemu_fails_part_way_instar_first(create: str, option: str, qemu_changed: str,
                                          tmp_path: Path) -> None:
    """Where qemu fails after its first steps are written (1-bit refcounts
    for a snapshot's clusters after the upgrade; a size that is no multiple
    of 512 after the width; a snapshot whose size is no longer the image's
    after the resize), instar refuses with qemu's message and exit
    status before its first write: its image is the one it was given."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA, snapshot=True)
    original = (pair.our_dir / pair.name).read_bytes()
    assert pair.both("-o", option, pair.name).rc == 1
    assert (pair.our_dir / pair.name).read_bytes() == original
    infos = [json.loads(qemu_img_ok("info", "--output=json", pair.name, cwd=d))
             ["format-specific"]["data"] for d in (pair.qemu_dir, pair.our_dir)]
    assert infos[0][qemu_changed] != infos[1][qemu_changed]


def test_snapshots_of_another_size_prevent_a_downgrade(tmp_path: Path) -> None:
    """A v2 snapshot has no size of its own: qemu refuses to downgrade an
    image whose snapshot's size is not the image's."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", pair.name, "8M", writes=_DATA, snapshot=True)
    for directory in (pair.qemu_dir, pair.our_dir):
        qemu_img_ok("resize", "-q", pair.name, "16M", cwd=directory)
    for option in ("compat=0.10", "compat=0.10,size=8M", "compat=0.10,size=4M"):
        qemu = pair.both("-o", option, pair.name)
        assert (qemu.rc, pair.name) == (1 if option != "compat=0.10,size=8M" else 0,
                                        pair.name), qemu
        if qemu.rc:
            _same_file(pair)
        pair.assert_same()


# --- encryption ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [
    "encrypt.iter-time=10", "encrypt.keyslot=1", "encrypt.new-secret=", "encrypt.old-secret=x",
    "encrypt.state=active", "encrypt.keyslot=x", "encrypt.iter-time=abc", "encryption=on",
    "encryption=off", "encrypt.format=luks", "encrypt.format=aes", "encrypt.key-secret=s0",
    "encrypt.cipher-alg=aes-256", "encrypt.keyslot=1,encryption=on",
    "encrypt.keyslot=1,refcount_bits=3", "encrypt.state=x,compat=9",
    "encrypt.keyslot=1,data_file=x", "encrypt.keyslot=1,data_file_raw=on",
    "encrypt.keyslot=1,size=1000", "encrypt.keyslot=1,lazy_refcounts=maybe",
    "data_file=x,compat=9", "data_file=x,data_file_raw=on", "data_file_raw=on,refcount_bits=3",
    "compat=9,refcount_bits=3", "nocow=on", "preallocation=full",
])
@pytest.mark.parametrize("create", ["compat=1.1", "data_file=d.raw"])
def test_encryption_options_on_plain_images(create: str, option: str, tmp_path: Path) -> None:
    """qemu's refusals, in its option loop's order (encryption first), for
    an image without encryption; the image unchanged."""
    pair = Pair(tmp_path)
    pair.make("-f", "qcow2", "-o", create, pair.name, "8M", writes=_DATA)
    original = (pair.our_dir / pair.name).read_bytes()
    assert pair.both("-o", option, pair.name).rc == 1
    assert (pair.our_dir / pair.name).read_bytes() == original


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LUKS and an AES qcow2 image, made once (LUKS's key derivation is
    timed: qemu-img sometimes fails to measure so short a time; tried again)."""
    directory = tmp_path_factory.mktemp("encrypted")
    images = {}
    for kind, extra in (("luks", ",encrypt.iter-time=50"), ("aes", "")):
        image = directory / f"{kind}.qcow2"
        for _ in range(5):
            made = run_qemu_img("create", "-q", "-f", "qcow2", "--object",
                                "secret,id=s0,data=abc", "-o",
                                f"encrypt.format={kind},encrypt.key-secret=s0{extra}",
                                str(image), "1M")
            if made.rc == 0:
                break
        assert made.rc == 0, made
        images[kind] = image
    return images


@pytest.mark.parametrize("encryption", ["luks", "aes"])
def test_encrypted_images_are_refused(encryption: str, tmp_path: Path) -> None:
    """qemu-img cannot open an encrypted image for amend without a secret
    (``--object``, ``--image-opts``), and instar takes neither and reads no
    encrypted image: refused in one line, exit 1 as qemu, the file unchanged.
    qemu's words differ (``Parameter 'encrypt.key-secret' is required for
    cipher``): instar says what it lacks. (One image per kind: making a LUKS
    one takes qemu-img seconds of key derivation timing; it sometimes fails
    to measure so short a time and is tried again.)"""
    image = tmp_path / "img.qcow2"
    extra = ",encrypt.iter-time=50" if encryption == "luks" else ""
    for _ in range(5):
        made = run_qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=abc",
                            "-o", f"encrypt.format={encryption},encrypt.key-secret=s0{extra}",
                            str(image), "1M")
        if made.rc == 0:
            break
    assert made.rc == 0, made
    before = image.read_bytes()
    for option in ("encrypt.keyslot=1", "encrypt.state=inactive", "lazy_refcounts=on",
                   "size=16M", "help", "encrypt.new-secret=x,encrypt.old-secret=abc"):
        qemu = run_qemu_img("amend", "-o", option, str(image))
        assert qemu.rc == 1 and "encrypt.key-secret" in qemu.stderr
        ours = run_instar("amend", "-o", option, str(image))
        assert ours.rc == 1 and ours.stdout == "" and ours.stderr.count("\n") == 1
        assert "encrypted images are not supported yet" in ours.stderr
        assert image.read_bytes() == before


# --- crash safety ----------------------------------------------------------------------------


def _state(image: Path) -> tuple[Any, bytes]:
    """What qemu-img sees (run beside the image, for a relative data file name)."""
    where = image.parent
    checked = run_qemu_img("check", image.name, cwd=where)
    assert checked.rc in (0, 3), checked  # a crash before a release leaks
    info = json.loads(qemu_img_ok("info", "--output=json", image.name, cwd=where))
    for key in ("actual-size", "dirty-flag", "filename"):
        info.pop(key, None)
    qemu_img_ok("convert", "-O", "raw", image.name, "state.raw", cwd=where)
    return info, (where / "state.raw").read_bytes()


@pytest.mark.parametrize("create,steps", [
    ("data_file=d.raw,data_file_raw=on", [[("data_file", "e.raw"), ("data_file_raw", "off")]]),
    ("compat=1.1", [[("refcount_bits", "64"), ("lazy_refcounts", "on")]]),
    ("compat=0.10", [[("compat", "1.1"), ("refcount_bits", "2")]]),
    ("compat=1.1", [[("refcount_bits", "8")], [("size", "12M")]]),
    ("compat=1.1,refcount_bits=64", [[("refcount_bits", "16")], [("size", "12M")],
                                     [("compat", "0.10")]]),
], ids=["data-file", "width-lazy", "upgrade-width", "width-size", "width-size-downgrade"])
def test_crash_at_every_write(create: str, steps: list[list[tuple[str, str]]],
                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One command making the changes of ``steps``, stopped after k changes
    for every k: the image is the one before, or the one after some first
    steps (each step is crash-safe; qemu makes them one after another too),
    never a mix; only leaks to repair."""
    from instar.amend import amend
    from instar.worker import SandboxSettings

    off = SandboxSettings(mode="off")
    allow = (str(tmp_path),)
    original = tmp_path / "o.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size=4k,{create}",
                original.name, "8M", cwd=tmp_path)
    for command in ("write -P 1 0 128k", "write -z 64k 64k", "write -P 2 5M 100k"):
        qemu_io(original, command, cwd=tmp_path)
    if "data_file" in create:
        shutil.copyfile(tmp_path / "d.raw", tmp_path / "e.raw")
    states = [_state(original)]
    stepped = tmp_path / "s.qcow2"
    shutil.copyfile(original, stepped)
    for step in steps:
        amend(str(stepped), step, sandbox=off, allow=allow)
        states.append(_state(stepped))
    everything = [pair for step in steps for pair in step]
    finished = tmp_path / "new.qcow2"
    shutil.copyfile(original, finished)
    amend(str(finished), everything, sandbox=off, allow=allow)
    assert _state(finished) == states[-1] != states[0]
    assert finished.read_bytes() == stepped.read_bytes()
    image = tmp_path / "k.qcow2"
    for k, done in stopped_runs(monkeypatch, original, image,
                                lambda: amend(str(image), everything, sandbox=off, allow=allow),
                                most=200, across=False):
        now = _state(image)
        assert now in states and (now == states[-1] or not done), k
        image.unlink()


# --- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["-o", "size=16M", "--help"], ["-h", "-o", "size=16M"], ["--object", "x", "-o", "size=16M"],
    ["--image-opts", "-o", "size=16M"], ["--force-share", "-o", "size=16M"],
], ids=" ".join)
def test_access_options(args: list[str], tmp_path: Path) -> None:
    """-h anywhere prints the help (exit 0); --object and --image-opts are
    refused in one line; -U/--force-share are not amend options (getopt's
    error, as qemu's). The image is unchanged."""
    image = tmp_path / "img.qcow2"
    qemu_img_ok("create", "-q", "-f", "qcow2", str(image), "8M")
    before = image.read_bytes()
    ours = run_instar("amend", *args, str(image))
    qemu = run_qemu_img("amend", *args, str(image))
    if "-h" in args or "--help" in args:
        assert (ours.rc, qemu.rc) == (0, 0) and ours.stdout.startswith("usage: instar amend")
    elif "--force-share" in args:
        assert (ours.rc, ours.normalised_stderr()) == (qemu.rc, qemu.normalised_stderr())
    else:
        assert ours.rc == 1 and ours.stderr.count("\n") == 1 and "not supported" in ours.stderr
    assert image.read_bytes() == before
