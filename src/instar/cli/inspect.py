"""``instar inspect``: one verdict on an upload (not a qemu-img command).

    instar inspect [-U] [-f claimed] [--output=ofmt] [--allow-backing]
                   [--allow-data-file] [--allow-extents] [--accept codes]
                   [--vmdk-types T1,T2] [--allow-formats F1,F2] [--policy FILE]
                   [--allow dir] FILE

Exit status: 0 safe, 2 unsafe, 1 could not inspect. docs/inspect.md has the
finding codes and the policy file.
"""

from __future__ import annotations

from instar.cli.access import AccessOptions
from instar.cli.getopt import GetoptError, gnu_getopt
from instar.errors import InvalidArgumentError, UsageError

HELP = """\
usage: instar inspect [-U] [-f claimed] [--output=ofmt] [--allow-backing]
                      [--allow-data-file] [--allow-extents] [--accept codes]
                      [--vmdk-types T1,T2] [--allow-formats F1,F2] [--policy file]
                      [--allow dir] filename

Say whether an image is safe to convert: its detected format, its virtual size,
and each finding (a stable code and a message). Exit status: 0 safe, 2 unsafe,
1 could not inspect.
  -f, --format claimed   the format the image is claimed to be (a finding if it is not)
  --output=ofmt          human (the default) or json
  --allow-backing        a backing file or parent is allowed (finding backing-file)
  --allow-data-file      a qcow2 external data file is allowed (data-file)
  --allow-extents        VMDK extent files are allowed (external-extent)
  --accept codes         allow these finding codes (comma-separated)
  --vmdk-types T1,T2     the VMDK create types allowed
                         (default monolithicSparse,streamOptimized)
  --allow-formats F1,F2  formats taken off the refused list (default: qed, luks refused)
  --policy file          read the policy from a file first (docs/inspect.md)
  --allow dir            files the image names may be opened from dir, where allowed
  -U, --force-share      read an image a running qemu holds a write lock on
  -h, --help             show this help

Not supported (refused): --object objectdef, --image-opts
"""

SHORT_OPTIONS = "hf:U"
LONG_OPTIONS = {"help": False, "format": True, "output": True, "allow-backing": False,
                "allow-data-file": False, "allow-extents": False, "accept": True,
                "vmdk-types": True, "allow-formats": True, "policy": True, "allow": True,
                "force-share": False, "object": True, "image-opts": False}
SWITCHES = {"--allow-backing": "backing-file", "--allow-data-file": "data-file",
            "--allow-extents": "external-extent"}


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def run(args: list[str]) -> int:
    from instar.verdict import InspectPolicy, load_policy, make_policy

    parsed = gnu_getopt(args, SHORT_OPTIONS, LONG_OPTIONS)
    claimed: str | None = None
    output = "human"
    accept: list[str] = []
    vmdk_types: list[str] | None = None
    allow_formats: list[str] = []
    policy_file: str | None = None
    access = AccessOptions()
    for option, value in access.command_options(parsed):
        if option in ("-f", "--format"):
            claimed = value
        elif option == "--output":
            if value not in ("human", "json"):
                raise UsageError("--output must be used with human or json as argument.")
            output = value
        elif option in SWITCHES:
            accept.append(SWITCHES[option])
        elif option == "--accept":
            accept += _list(value)
        elif option == "--vmdk-types":
            vmdk_types = _list(value)
        elif option == "--allow-formats":
            allow_formats += _list(value)
        elif option == "--policy":
            policy_file = value
    if len(parsed.operands) != 1:
        raise GetoptError("Expecting one image file name")
    base = load_policy(policy_file) if policy_file is not None else InspectPolicy()
    try:
        policy = make_policy(accept=accept, vmdk_types=vmdk_types,
                             allow_formats=allow_formats, base=base)
    except InvalidArgumentError as error:
        raise UsageError(str(error)) from None
    from instar.cli.info import write_stdout
    from instar.inspection import inspect

    verdict = inspect(parsed.operands[0], claimed, policy=policy, allow=access.allowed,
                      force_share=access.force_share)
    write_stdout(verdict.render_json() if output == "json" else verdict.render_human())
    return verdict.exit_code
