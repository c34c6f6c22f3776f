"""Confinement of the child that loads untrusted native models (:mod:`joey_registry.convert_process`):
no network, and a filesystem it may read only where Python and its libraries live and write only in
the directory the registry gave it.

Unpickling runs the file's code, so rlimits and a minimal environment are not enough: the code could
read the credentials file, another model's artifact, or the registry's environment through
``/proc/<pid>/environ``, and send them anywhere; as root it could use the host's capabilities. Kernel
mechanisms close that, all usable without privileges:

- a user namespace and a network namespace of its own (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``, root
  or not): no interface but a loopback nobody listens on, and capabilities only over what that user
  namespace owns; then every capability dropped, the bounding set's included, and no_new_privs, so it
  holds none (a root registry's child, where user namespaces are refused, is still uid 0 but without
  capabilities: that is checked, and a child left with one is refused);
- Landlock (Linux 5.13+): rules on which paths may be read and written; a landlocked process also
  cannot ptrace, and so cannot read the ``/proc/<pid>/environ`` or memory of, any process outside;
- a seccomp filter (libseccomp): Landlock does not cover ``connect()`` to a Unix socket on disk (a
  local Postgres's, say) and the network namespace cuts only TCP/IP, so the process may create no
  socket of any family at all, nor leave its process group (the registry kills the group when the
  conversion ends, grandchildren included), nor ptrace or write another process's memory, nor make
  namespaces, nor reach the calls that act on the whole host (modules, bpf, clocks, mounts, ...), nor
  change a file's owner, times, extended attributes or any mode bit beyond its owner's (Landlock
  covers contents, not metadata, and a root registry's child owns root's files), nor set another
  process's rlimits (prlimit64 on any pid but its own 0).

No maintained Python binding covers Landlock's network and scope rules, nor capabilities' bounding
set without building against libcap, and the calls are a few syscalls, so they are made here with
ctypes. What a kernel does not offer is reported, not faked:
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
_CLONE_NEWIPC = 0x08000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
_NOBODY = 65534

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
    """Move this process into a user namespace and a network namespace of its own; a note when the
    machine refuses both.

    Always the user namespace too, root or not: a root process given only the network namespace keeps
    every capability over the host (the hostname, other users' files, bpf). Inside its own user
    namespace its capabilities reach only what that namespace owns (the empty network namespace). Where
    user namespaces are refused (a container's profile, a sysctl), root still makes the network
    namespace alone, and :func:`drop_capabilities` takes its capabilities away."""
    uid, gid = os.geteuid(), os.getegid()
    # An IPC namespace too: System V shared memory and queues of the host's would outlive the child
    # (the host never removes a detached segment), memory no limit counts, and a root child's are root's.
    if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWIPC) == 0:
        return _map_ids(uid, gid)
    if _libc.unshare(_CLONE_NEWNET | _CLONE_NEWIPC) == 0:
        return ""
    return f"network not isolated: {os.strerror(ctypes.get_errno())} (unshare CLONE_NEWNET)"


def _map_ids(uid: int, gid: int) -> str:
    """The registry's uid and gid as the only ones of the new namespace, root's seen inside as nobody;
    without a map, files it creates have no owner the kernel can write down (EOVERFLOW)."""
    try:
        Path("/proc/self/setgroups").write_text("deny")  # an unprivileged gid_map needs this first
        Path("/proc/self/uid_map").write_text(f"{uid or _NOBODY} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid or _NOBODY} {gid} 1")
    except OSError as exc:
        return f"user ids not mapped: {exc.strerror} (/proc/self/uid_map)"
    return ""


def drop_capabilities() -> str:
    """Give up every capability, the bounding set's too, so that nothing this process runs regains one;
    a note naming what is left when any effective or permitted capability remains (fail closed: the
    registry refuses to convert in a child that could still use one)."""
    try:
        _give_up_capabilities()
        failed = ""
    except OSError as exc:
        failed = f" ({exc.strerror})"
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    held = [f"{name} {status[name].strip()}" for name in ("CapEff", "CapPrm") if int(status[name], 16)]
    if not held:
        return ""
    return f"capabilities not dropped: uid {status['Uid'].split()[1]} holds {', '.join(held)}{failed}"


def _give_up_capabilities() -> None:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        # EPERM: no CAP_SETPCAP, so a process without capabilities already (no_new_privs below keeps
        # an exec from gaining any through a set-uid or file-capability binary).
        if _libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EPERM:
            raise _fail("prctl(PR_CAPBSET_DROP)")
    if _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    # Version 3: two 32-bit words of effective, permitted and inheritable sets, all empty.
    if _libc.capset(struct.pack("Ii", _CAPABILITY_VERSION_3, 0), bytes(2 * 3 * 4)) != 0:
        raise _fail("capset")
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")


# io_uring creates and connects sockets without the socket() call; the process group as the module's
# docstring says; the rest is what a root process (or one with capabilities in its user namespace) could
# use against the host or to get out of the sandbox: kernel modules and programs, clocks and names the
# host shares, mounts, keyrings, tracing other processes, and new namespaces once its own are set up
# (the filter is installed after them), through clone too.
_DENIED_SYSCALLS = (
    "socket",
    "socketpair",
    "io_uring_setup",
    "setsid",
    "setpgid",
    "ptrace",
    "process_vm_writev",
    "process_vm_readv",
    "bpf",
    "perf_event_open",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "sethostname",
    "setdomainname",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "mount",
    "umount2",
    "pivot_root",
    "swapon",
    "swapoff",
    "reboot",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    # Watches report the names of files created in directories Landlock keeps the child from listing.
    "inotify_init",
    "inotify_init1",
    "fanotify_init",
)
# Landlock rules cover a file's contents, not its metadata, and a root registry's child is still uid 0
# on the host (nobody only inside its user namespace), so the owner of every root file: it could make a
# root binary set-uid, a 0600 secret world-readable, a program or directory no one else may use, or
# forge times and attributes. Owner, times and extended attributes are refused outright (no conversion
# sets them). A mode change is not made but reported done: conversions chmod their own files (0700,
# 0600), which their defaults serve as well, and a refusal would fail them. setxattrat, removexattrat and
# file_setattr (Linux 6.13, 6.17) are newer than some libseccomp releases, which do not know their
# names: their numbers, the same on every architecture for calls added since Linux 5.1, stand in.
_METADATA_SYSCALLS = (
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "setxattrat",
    "removexattrat",
    "file_setattr",
)
_UNIFIED_NUMBERS = {"setxattrat": 463, "removexattrat": 466, "file_setattr": 469}
_IGNORED_SYSCALLS = ("chmod", "fchmod", "fchmodat", "fchmodat2")
# Calls addressed to a process by pid (argument 0; pid 0 is the caller): on another process of the same
# host uid (the registry itself, another conversion) prlimit64 would set its limits (a CPU limit below
# what it used kills it with SIGXCPU) and the scheduling calls would starve it. prlimit64 is refused;
# the scheduling calls, which thread pools make on their own threads by id, are reported done.
_PID_ADDRESSED = {"prlimit64": 0}
_PID_ADDRESSED_IGNORED = {
    "sched_setattr": 0,
    "sched_setscheduler": 0,
    "sched_setparam": 0,
    "sched_setaffinity": 0,
    "ioprio_set": 1,
    "setpriority": 1,
}
# setpriority and ioprio_set also address a process group or a uid (argument 0 not PRIO_PROCESS = 0,
# IOPRIO_WHO_PROCESS = 1), "my uid" with who 0: every process of the registry's: reported done too.
_SCOPE_ADDRESSED_IGNORED = {"setpriority": 0, "ioprio_set": 1}
# ioctls that set a host file's flags (sync, nodump, noatime...) or version through a descriptor open
# for reading: FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR, FS_IOC_SETVERSION and its 32-bit form.
# EXT4_IOC_SETVERSION (and its 32-bit form), FS_IOC_ENABLE_VERITY (a file read-only for ever),
# FS_IOC_SET_ENCRYPTION_POLICY, btrfs's BTRFS_IOC_SUBVOL_SETFLAGS likewise.
_REFUSED_IOCTLS = (
    0x40086602,
    0x40046602,
    0x401C5820,
    0x40087602,
    0x40047602,
    0x40086604,
    0x40046604,
    0x40806685,
    0x800C6613,
    0x4008941A,
)
_F_SETLEASE = 1024  # a read lease on a host file stalls its writers for the lease-break time
_COMMAND = 0xFFFFFFFF  # ioctl's and fcntl's command is 32 bits to the kernel: higher bits must not hide it
# clone's flags that make namespaces, refused like unshare, and CLONE_PARENT, whose children would be the
# registry's (zombies it never reaps, until the host has no pid left). clone3 passes its flags in memory
# a filter cannot read, so it reports ENOSYS, which makes the C library fall back to clone.
_REFUSED_CLONE_FLAGS = (
    0x00008000,
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    _CLONE_NEWUSER,
    0x20000000,
    _CLONE_NEWNET,
)


def filter_syscalls() -> str:
    """Make the calls of :data:`_DENIED_SYSCALLS` fail with EPERM for this process and what it starts;
    a note when the filter cannot be installed."""
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as exc:  # the package is there, libseccomp is not
        return f"system calls not filtered: {exc} (pyseccomp, libseccomp)"
    try:
        # Other architectures' calls (i386's socketcall through int 0x80, x32's) kill the process.
        # The library's default kills only the calling thread: a process whose other threads
        # (OpenBLAS's, torch's) live on would reply nothing until the conversion's timeout.
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        rules.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        denied = pyseccomp.ERRNO(errno.EPERM)
        for name in _DENIED_SYSCALLS:
            rules.add_rule(denied, name)
        for name in _METADATA_SYSCALLS:
            known = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            rules.add_rule(denied, known if known >= 0 else _UNIFIED_NUMBERS[name])
        done = pyseccomp.ERRNO(0)  # the call returns 0, having done nothing
        for name in _IGNORED_SYSCALLS:
            rules.add_rule(done, name)
        for table, action in ((_PID_ADDRESSED, denied), (_PID_ADDRESSED_IGNORED, done)):
            for name, argument in table.items():
                rules.add_rule(action, name, pyseccomp.Arg(argument, pyseccomp.NE, 0))
        for name, process in _SCOPE_ADDRESSED_IGNORED.items():
            rules.add_rule(done, name, pyseccomp.Arg(0, pyseccomp.NE, process))
        for request in _REFUSED_IOCTLS:
            rules.add_rule(denied, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _COMMAND, request))
        rules.add_rule(denied, "fcntl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _COMMAND, _F_SETLEASE))
        for flag in _REFUSED_CLONE_FLAGS:  # rules on one call are or-ed: any one of these flags refuses
            rules.add_rule(denied, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
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
