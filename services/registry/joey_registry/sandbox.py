"""Confinement of the child that loads untrusted native models (:mod:`joey_registry.convert_process`):
no network, and a filesystem it may read only where Python and its libraries live and write only in
the directory the registry gave it.

Unpickling runs the file's code, so rlimits and a minimal environment are not enough: the code could
read the credentials file, another model's artifact, or the registry's environment through
``/proc/<pid>/environ``, and send them anywhere. Two kernel mechanisms close that, both usable without
privileges:

- a network namespace of its own (``unshare(CLONE_NEWNET)``, inside a user namespace when not root):
  no interface but a loopback nobody listens on;
- Landlock (Linux 5.13+): rules on which paths may be read and written; a landlocked process also
  cannot ptrace, and so cannot read the ``/proc/<pid>/environ`` or memory of, any process outside;
- a seccomp filter (libseccomp): Landlock does not cover ``connect()`` to a Unix socket on disk (a
  local Postgres's, say) and the network namespace cuts only TCP/IP, so the process may create no
  socket of any family at all, nor leave its process group (the registry kills the group when the
  conversion ends, grandchildren included), nor ptrace or write another process's memory.

No maintained Python binding covers Landlock's network and scope rules, and the calls are three
syscalls, so they are made here with ctypes. What a kernel does not offer is reported, not faked:
each function returns a note the conversion log shows (or the registry refuses to convert on).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_READ = _EXECUTE | _READ_FILE | _READ_DIR
# Every filesystem right of ABI 1 (bits 0-12), then REFER (ABI 2), TRUNCATE (3) and IOCTL_DEV (5).
_ABI_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_TCP = 0b11  # BIND_TCP | CONNECT_TCP (ABI 4): handled with no rule, so neither is allowed
_SCOPE_ALL = 0b11  # abstract unix sockets and signals outside the domain (ABI 6)

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def isolate_network() -> str:
    """Move this process into a network namespace of its own; a note when the machine refuses."""
    if _libc.unshare(_CLONE_NEWNET) == 0:
        return ""
    # Not root: a user namespace of its own first grants the right to make the network one.
    if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return ""
    return f"network not isolated: {os.strerror(ctypes.get_errno())} (unshare CLONE_NEWNET)"


# io_uring creates and connects sockets without the socket() call; the rest as the docstring says.
_DENIED_SYSCALLS = (
    "socket",
    "socketpair",
    "io_uring_setup",
    "setsid",
    "setpgid",
    "ptrace",
    "process_vm_writev",
    "process_vm_readv",
)


def filter_syscalls() -> str:
    """Make the calls of :data:`_DENIED_SYSCALLS` fail with EPERM for this process and what it starts;
    a note when the filter cannot be installed."""
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as exc:  # the package is there, libseccomp is not
        return f"system calls not filtered: {exc} (pyseccomp, libseccomp)"
    try:
        # Other architectures' calls (i386's socketcall through int 0x80) kill the process: the
        # library's default for a foreign architecture.
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in _DENIED_SYSCALLS:
            rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        rules.load()
    except (OSError, RuntimeError, ValueError) as exc:
        return f"system calls not filtered: {exc} (seccomp)"
    return ""


def _abi() -> int:
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def restrict_filesystem(readable: Iterable[Path], writable: Iterable[Path]) -> str:
    """Allow reading only beneath ``readable`` and reading and writing only beneath ``writable``, for
    this process and what it starts; a note when the kernel has no Landlock."""
    abi = _abi()
    if abi < 1:
        return "filesystem not confined: the kernel has no Landlock"
    fs_rights = _ABI_FS_RIGHTS[max(v for v in _ABI_FS_RIGHTS if v <= abi)]
    attr = struct.pack("QQQ", fs_rights, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(_SYS_CREATE_RULESET, attr, ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        for rights, paths in ((_READ, readable), (fs_rights, writable)):
            for path in paths:
                _allow(ruleset, path, rights)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ""


# Rights Landlock grants on a file (not a directory) beneath it: the others apply to directories only.
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | (1 << 14) | (1 << 15)


def _allow(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            return  # a path on sys.path that does not exist: nothing to allow
        raise
    try:
        if not path.is_dir():
            rights &= _FILE_RIGHTS
        attr = struct.pack("=Qi", rights, fd)
        if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, attr, 0) != 0:
            raise _fail(f"landlock_add_rule({path})")
    finally:
        os.close(fd)
