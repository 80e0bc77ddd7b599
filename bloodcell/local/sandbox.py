"""Run a command that may write only beneath given folders (Linux Landlock; no privileges needed).

The local object store (fake-gcs-server) joins object names to its folder unchecked, so an upload named
``../../x`` lands outside it; any local user can reach its loopback port. Confined, such a write fails.

    python -m bloodcell.local.sandbox --writable PATH [--writable PATH ...] -- COMMAND [ARG ...]

Landlock is in Linux since 5.13; Python has no binding, hence the few syscalls below (x86-64 and arm64
share their numbers). Reading and executing stay allowed everywhere. What is confined depends on the
kernel's Landlock ABI:

- ABI 1 (Linux 5.13-5.18): creating, writing, removing and renaming files and folders, and making links,
  devices, sockets and pipes, outside the allowed folders (a rename or link across folders is always
  refused, inside them too); **truncating** an existing file outside them (``truncate``, ``O_TRUNC``) is
  not confined.
- ABI 2 (5.19-6.1): the same, and renames and links across the allowed folders are allowed again
  (REFER); truncating is still not confined.
- ABI 3 and later (6.2+): truncating too. :func:`partial_confinement` names what is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# Access rights that change the filesystem (include/uapi/linux/landlock.h), by the ABI that added them.
WRITE_ACCESS_BY_ABI = {
    1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12),
    2: 1 << 13,  # REFER: renames and links across folders
    3: 1 << 14,  # TRUNCATE
}
FILE_ACCESS = (1 << 1) | (1 << 14)  # the rights a rule on a single file (e.g. /dev/null) may carry


class SandboxUnavailable(OSError):
    """This system cannot confine a process's writes (not Linux, or Landlock is off)."""


def _libc() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"Landlock is Linux-only (this is {sys.platform})")
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version; :class:`SandboxUnavailable` without Landlock."""
    version = _libc().syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    if version < 1:
        raise SandboxUnavailable(f"Landlock is not enabled in this kernel ({os.strerror(ctypes.get_errno())})")
    return version


TRUNCATE_ABI = 3


def partial_confinement(abi: int) -> str | None:
    """What confinement does not cover on Landlock ABI ``abi``, None when it covers every write."""
    if abi < TRUNCATE_ABI:
        return f"on Landlock ABI {abi} (Linux before 6.2) truncating a file outside the allowed folders is not blocked"
    return None


def confine_writes(writable: list[str]) -> None:
    """From now on this process and its children may change files only beneath ``writable``."""
    libc = _libc()
    abi = abi_version()
    handled = sum(bits for added_in, bits in WRITE_ACCESS_BY_ABI.items() if added_in <= abi)
    ruleset_attr = struct.pack("=Q", handled)  # struct landlock_ruleset_attr: handled_access_fs only
    ruleset = libc.syscall(SYS_CREATE_RULESET, ruleset_attr, len(ruleset_attr), 0)
    if ruleset < 0:
        raise SandboxUnavailable(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for path in writable:
            _allow_beneath(libc, ruleset, path, handled)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise SandboxUnavailable(f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)


def _allow_beneath(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> None:
    folder = os.open(path, os.O_PATH)
    try:
        if not os.path.isdir(path):
            access &= FILE_ACCESS
        rule = struct.pack("=Qi", access, folder)  # struct landlock_path_beneath_attr (packed)
        if libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0) != 0:
            raise SandboxUnavailable(f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodcell.local.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--writable", action="append", required=True, help="a folder (or file) the command may change")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    confine_writes(args.writable)
    # Running the given command is this tool's purpose.
    os.execvp(command[0], command)  # nosec B606
    return 127  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
