"""The conversion core without the stack: how a conversion's outputs are compared with the native
library's, an ExportedProgram converted in its confined child (the end-to-end tests take TorchScript:
tests/joey/client/test_native_models.py), and what a pickle's own code cannot do from that child: make a
socket, outlive its conversion, cost the registry memory, load where the sandbox is missing, use a root
registry's capabilities, change a host file's metadata or the registry's limits, read devices or the
registry's path, write or start beyond its limits, forge its replies, or hang its load."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg
import pytest

from joey_core.models import TensorSpec
from joey_registry.app import RegistryServer
from joey_registry.artifacts import FilesystemArtifactStore
from joey_registry.conversion import ConversionFailed, Conversions
from joey_registry.converters import verify
from joey_registry.errors import InvalidArgument
from tests.conftest import wait_until
from tests.registry.helpers import Payload, probe_code, probed


def test_outputs_within_the_tolerance_pass_and_say_how_close_they_came() -> None:
    native = {"variable": np.array([100.0, -2.0, 0.0])}
    converted = {"variable": np.array([[100.09], [-2.0005], [0.0009]], dtype=np.float32)}
    assert verify.compare(native, converted, "generated inputs").startswith(
        "verified on generated inputs: variable: at most 0.09"
    )


def test_a_value_beyond_the_tolerance_is_refused_naming_output_row_and_difference() -> None:
    native = {"variable": np.array([1.0, 2.0, 3.0])}
    with pytest.raises(InvalidArgument) as refused:
        verify.compare(native, {"variable": np.array([1.0, 2.5, 3.0])}, "the sample input")
    assert str(refused.value) == (
        "the converted model disagrees with the native one on output 'variable' by 0.5 on the sample input "
        "(1 of 3 values; row 1: 2.5 instead of 2; tolerance 0.001 + 0.001 x |value|)"
    )


@pytest.mark.parametrize(
    ("native", "converted", "reason"),
    [
        # A NaN in both places hid the other rows: argmax of a difference holding NaN picks the NaN.
        ([np.nan, 1.0, 2.0], [np.nan, 5.0, -7.0], "by 9 on x (2 of 3 values; row 2: -7 instead of 2"),
        ([np.inf, 1.0], [-np.inf, 1.0], "by inf on x (1 of 2 values; row 0: -inf instead of inf"),
        ([np.nan, 1.0], [0.0, 1.0], "by nan on x (1 of 2 values; row 0: 0 instead of nan"),
        ([1.0, 2.0], [np.inf, 2.0], "by inf on x (1 of 2 values; row 0: inf instead of 1"),
    ],
)
def test_values_that_are_not_finite_agree_only_with_the_same_value(
    native: list[float], converted: list[float], reason: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(reason)):
        verify.compare({"v": np.array(native)}, {"v": np.array(converted)}, "x")
    same = np.array([np.nan, np.inf, -np.inf, 1.0])
    assert (
        verify.compare({"v": same}, {"v": same + [0, 0, 0, 5e-4]}, "x")
        == "verified on x: v: at most 0.0005 apart"
    )


def test_labels_must_match_except_where_the_native_model_is_torn() -> None:
    probabilities = np.array([[0.9, 0.1], [0.5004, 0.4996], [0.2, 0.8]])
    native = {"label": np.array([0, 0, 1]), "probabilities": probabilities}
    # Row 1 is a tie within the tolerance: either label is right.
    assert "label: equal" in verify.compare(
        native, {"label": np.array([0, 1, 1]), "probabilities": probabilities}, "generated inputs"
    )
    with pytest.raises(InvalidArgument, match="on output 'label': 1 of 3 values differ .* \\(row 2: \\[0\\]"):
        verify.compare(native, {"label": np.array([0, 0, 0]), "probabilities": probabilities}, "x")
    with pytest.raises(InvalidArgument, match="has no output 'probabilities'"):
        verify.compare(native, {"label": np.array([0, 0, 1])}, "x")


def test_a_sample_that_does_not_fit_the_model_is_refused() -> None:
    specs = (TensorSpec("input", "float32", (-1, 4)),)
    assert verify.sample(specs, {"input": [1, 2, 3, 4]})["input"].shape == (1, 4)
    with pytest.raises(InvalidArgument, match="sample input 'input' has shape \\[2, 3\\]"):
        verify.sample(specs, {"input": [[1, 2, 3], [4, 5, 6]]})
    with pytest.raises(
        InvalidArgument, match="the sample input has \\['x'\\], but the model takes \\['input'\\]"
    ):
        verify.sample(specs, {"x": [1, 2, 3, 4]})


def test_an_exported_program_converts_with_a_dynamic_batch(tmp_path: Path) -> None:
    import torch

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0 + 1.0

    batch = torch.export.Dim("batch")
    program = torch.export.export(Scale(), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "scale.pt2")
    conversions = Conversions(
        memory_mb=6144, cpu_s=120, timeout_s=300, concurrency=1, max_output_bytes=1 << 24
    )
    specs = (TensorSpec("x", "float32", (-1, 3)),)
    conversion = conversions.start("pytorch", tmp_path / "scale.pt2", specs, {"x": [[1, 2, 3]]}, tmp_path)
    assert conversion.description == "an ExportedProgram taking x"
    onnx_path, log = conversion.finish()
    assert log[-1].startswith("verified on the sample input: output: at most 0 apart")
    session = ort.InferenceSession(str(onnx_path))
    (out,) = session.run(None, {"x": np.ones((5, 3), dtype=np.float32)})
    assert out.tolist() == [[3.0] * 3] * 5
    conversion.remove()


def test_a_conversion_no_registry_finishes_becomes_an_error_once_older_than_any_can_take(
    registry_server: RegistryServer, database_url: str
) -> None:
    registry = registry_server.registry
    name = f"orphan-{secrets.token_hex(4)}"
    registry.store.create_workspace(name, "admin")
    ws = registry.store.workspace(name)
    assert ws is not None
    source = ("ab" * 32, 10)
    fresh = registry.store.add_model_version(ws, name, "", 0, "sklearn", (), (), lambda: None, source=source)
    old = registry.store.add_model_version(ws, name, "", 0, "sklearn", (), (), lambda: None, source=source)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE model_versions v SET created_at = now() - interval '1 day' FROM models m "
            "WHERE m.id = v.model_id AND m.name = %s AND v.version = %s",
            (name, old.version),
        )
    # The session stack's registry, on the same database, may expire it first in its reconciler round.
    assert registry.expire_conversions() in (0, 1)
    stopped = registry.store.get_model_version(ws, name, old.version)
    assert stopped is not None and stopped.status == "error"
    assert stopped.conversion_log == "the registry stopped during the conversion; upload the model again"
    # A conversion younger than the limits may still be running in another registry: left alone.
    running = registry.store.get_model_version(ws, name, fresh.version)
    assert running is not None and running.status == "converting"


@pytest.fixture(scope="module")
def conversions() -> Conversions:
    return Conversions(memory_mb=4096, cpu_s=60, timeout_s=120, concurrency=4, max_output_bytes=1 << 24)


def payload(folder: Path, code: str) -> Path:
    path = folder / f"payload-{secrets.token_hex(4)}.pkl"
    path.write_bytes(pickle.dumps(Payload(code)))
    return path


def staging_of(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    return staging


# CONNECT, GRANDCHILD and FLOOD run in the conversion child as a pickle loads: the file's own code.
CONNECT = """
import json, os, socket, time
import psycopg
tried = {}
inside = os.path.join(os.getcwd(), "inside.sock")
deadline = time.monotonic() + 60
while not os.path.exists(inside) and time.monotonic() < deadline:
    time.sleep(0.01)
for name, path in (("inside", inside), ("outside", OUTSIDE)):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        tried[name] = "connected"
    except OSError as exc:
        tried[name] = exc.strerror
for name, make in (("tcp", lambda: socket.socket()), ("pair", socket.socketpair)):
    try:
        make()
        tried[name] = "created"
    except OSError as exc:
        tried[name] = exc.strerror
try:
    psycopg.connect("host=/var/run/postgresql user=postgres dbname=postgres", connect_timeout=3).close()
    tried["postgres"] = "connected"
except psycopg.Error as exc:
    tried["postgres"] = str(exc)
raise ValueError("TRIED " + json.dumps(tried))
"""


def test_a_pickle_can_make_no_socket_to_reach_one_on_disk(conversions: Conversions, tmp_path: Path) -> None:
    staging = staging_of(tmp_path)
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(str(tmp_path / "outside.sock"))
    outside.listen()
    inside = socket.socket(socket.AF_UNIX)

    def listen_in_its_work_directory() -> None:
        # A socket where the child may write: Landlock alone would let it connect there.
        (workdir,) = wait_until(lambda: list(staging.glob("*.convert")), 60, "the conversion's directory")
        inside.bind(str(workdir / "inside.sock"))
        inside.listen()

    listener = threading.Thread(target=listen_in_its_work_directory)
    listener.start()
    code = f"OUTSIDE = {str(tmp_path / 'outside.sock')!r}\n{CONNECT}"
    with pytest.raises(InvalidArgument, match="TRIED ") as refused:
        conversions.start("sklearn", payload(tmp_path, code), (), None, staging)
    listener.join()
    tried = json.loads(str(refused.value).split("TRIED ", 1)[1].rsplit("; nothing was stored", 1)[0])
    for name in ("inside", "outside", "tcp", "pair"):
        assert tried[name] == "Operation not permitted", tried
    assert tried["postgres"] != "connected", tried  # libpq says only "connection is bad"
    for server in (inside, outside):
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection waiting
        server.close()


GRANDCHILD = """
import os, time
if os.fork() == 0:
    try:
        os.setsid()
        left = "left its group"
    except OSError as exc:
        left = exc.strerror
    with open("grandchild.tmp", "w") as out:
        out.write(f"{os.getpid()} {left}")
    os.rename("grandchild.tmp", "grandchild.pid")
    while not os.path.exists("model.onnx") or not os.path.getsize("model.onnx"):
        time.sleep(0.01)
    fd = os.open("model.onnx", os.O_WRONLY)
    while os.path.exists("model.onnx"):  # the registry took the file: now change what it stored
        time.sleep(0.01)
    os.pwrite(fd, b"POISON", 0)
    time.sleep(600)
    os._exit(0)
while not os.path.exists("grandchild.pid"):
    time.sleep(0.01)
"""


def test_a_grandchild_ends_with_its_conversion_and_cannot_change_what_is_stored(
    conversions: Conversions, tmp_path: Path
) -> None:
    staging = staging_of(tmp_path)
    conversion = conversions.start("sklearn", payload(tmp_path, GRANDCHILD), (), None, staging)
    onnx_path, _ = conversion.finish()
    pid, left = (conversion.workdir / "grandchild.pid").read_text().split(" ", 1)
    assert left == "Operation not permitted"
    store = FilesystemArtifactStore(tmp_path / "store")
    sha256 = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    store.put(sha256, onnx_path)
    conversion.remove()
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the grandchild {pid} is still running ({state})"
    with store.open(sha256) as stored:
        assert hashlib.sha256(stored.read()).hexdigest() == sha256
    assert [p.name for p in staging.iterdir()] == []


FLOOD = """
import os
block = b"x" * (16 << 20)
for fd in (2, 3):  # stderr, then the reply channel (the first descriptor the child opened)
    for _ in range(7):
        os.write(fd, block)
"""


def _memory_kib(field: str) -> int:
    (line,) = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field)]
    return int(line.split()[1])


def test_what_a_child_prints_costs_the_registry_no_memory(conversions: Conversions, tmp_path: Path) -> None:
    # This process is the registry here: Conversions reads the child's output in it. Its peak is reset
    # to the memory it uses now, so the peak after is what reading 224 MB cost.
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory_kib("VmRSS:")
    with pytest.raises(InvalidArgument) as refused:
        conversions.start("sklearn", payload(tmp_path, FLOOD), (), None, staging_of(tmp_path))
    assert _memory_kib("VmHWM:") - before < 100 << 10
    assert f"the conversion's reply is longer than {1 << 20} bytes; nothing was stored" == str(refused.value)


def test_a_sandbox_that_cannot_be_set_up_is_refused_unless_the_setting_allows(tmp_path: Path) -> None:
    # A registry on a machine that refuses namespaces: its children inherit a filter making unshare fail.
    script = f"""
import errno, json, sys
from pathlib import Path
import pyseccomp
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare")
rules.load()
from joey_registry.conversion import ConversionFailed, Conversions
from joey_registry.errors import FailedPrecondition
seen = {{}}
for require in (True, False):
    conversions = Conversions(4096, 60, 120, 1, 1 << 24, require_sandbox=require)
    folder = Path({str(tmp_path)!r})
    try:
        conversion = conversions.start("sklearn", folder / "m.pkl", (), None, folder)
        seen[str(require)] = ["converted", *conversion.finish()[1]]
        conversion.remove()
    except FailedPrecondition as exc:
        seen[str(require)] = ["refused", str(exc)]
print(json.dumps(seen))
"""
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(Payload("")))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["True"] == [
        "refused",
        "the conversion sandbox could not be set up: network not isolated: Operation not permitted "
        "(unshare CLONE_NEWNET); nothing was stored (JOEY_CONVERSION_REQUIRE_SANDBOX=false converts "
        "unconfined)",
    ]
    assert seen["False"][0] == "converted"
    assert "network not isolated: Operation not permitted (unshare CLONE_NEWNET)" in seen["False"]


# A file whose code hangs as it loads, and one that makes an x32 system call (another architecture's,
# to the filter) with a second thread running, which outlived its killed main thread before the filter
# killed whole processes: both hung the registry's wait until its timeout. And one that exits, its
# last line of stderr (which the refusal quotes) long and with a terminal's control sequence.
HANGING = {
    "exits": (
        "import os\nos.write(2, b'ERROR first\\n\\x1b[2J' + b'y' * 5000 + b'\\n')\nos._exit(1)\n",
        60,
        "the conversion failed (exit status 1): \\x1b[2J" + "y" * 996,
    ),
    "hangs": (
        "import time\ntime.sleep(600)\n",
        2,
        "the file took longer than 2 s (JOEY_CONVERSION_TIMEOUT_S) to load",
    ),
    "x32 call": (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "ctypes.CDLL(None).syscall(0x40000000 | 41, 2, 1, 0)\n",
        60,
        "the conversion crashed its process (signal 31): the file is not a model it can load",
    ),
}


@pytest.mark.parametrize("case", HANGING)
def test_a_file_that_hangs_crashes_or_exits_as_it_loads_is_refused_in_a_line(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    code, timeout_s, reason = HANGING[case]
    waiting = Conversions(4096, 60, timeout_s, 1, 1 << 24)
    with pytest.raises(InvalidArgument) as refused:
        waiting.start("sklearn", payload(tmp_path, code), (), None, staging_of(tmp_path))
    assert str(refused.value) == f"{reason}; nothing was stored"
    # What the registry logged of the child's output starts no line of its own.
    logged = [r.getMessage() for r in caplog.records if r.name == "joey_registry.conversion"]
    assert all("\n" not in message for message in logged), logged


# What a pickle of a root registry would use the host's capabilities for, each harmless if it succeeded:
# setting the hostname the host has, a bpf call that fails (EINVAL) right after its permission check, a
# user namespace for the child alone.
HOST_POWERS = {
    "hostname": "checked(libc.sethostname(os.uname().nodename.encode(), len(os.uname().nodename.encode())))",
    "capabilities": "[line.split()[1] for line in open('/proc/self/status') if line.startswith('CapEff')][0]",
    "bpf": "checked(libc.syscall(syscall_number('bpf'), 0, None, 0))",
    # A user namespace of its own would give it every capability again, inside it.
    "unshare": "checked(libc.unshare(0x10000000))",
}
NO_HOST_POWER = {
    "hostname": ["error", "Operation not permitted"],
    "capabilities": ["ok", "'0000000000000000'"],
    "bpf": ["error", "Operation not permitted"],
    "unshare": ["error", "Operation not permitted"],
}


SHM_KEY = 0x4A6F6579  # "Joey": a System V key no other program on the host uses


def test_a_pickle_holds_no_capability_reads_no_device_nor_path_entry_and_keeps_its_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry runs as root here (and in CI and the image). In /dev/shm, where Postgres's segments
    # are: another user's file, readable only with a capability (CAP_DAC_OVERRIDE), and the registry's
    # own, which only the sandbox keeps the child from.
    others, own = (Path(f"/dev/shm/joey-test-{secrets.token_hex(4)}") for _ in range(2))
    for shared in (others, own):
        shared.write_text("shared memory")
        shared.chmod(0o600)
    os.chown(others, 65534, 65534)
    # A directory on the registry's sys.path (PYTHONPATH) that holds more than packages: a secret beside.
    added = tmp_path / "on-the-path"
    added.mkdir()
    (added / "secret.txt").write_text("not for a pickle")
    monkeypatch.syspath_prepend(str(added))
    # Root's files on the host, which a root registry's child owns (uid 0 outside its namespace): a
    # secret, and a program it would make set-uid root. Landlock does not cover their metadata.
    secret, program = tmp_path / "secret.txt", tmp_path / "true"
    secret.write_text("root's")
    secret.chmod(0o600)
    shutil.copy("/bin/true", program)
    metadata = {path: (path.stat().st_mode, path.stat().st_mtime_ns) for path in (secret, program)}
    core = resource.getrlimit(resource.RLIMIT_CORE)
    scheduling = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    attempts = HOST_POWERS | {
        "readable by all": f"os.chmod({str(secret)!r}, 0o644)",
        "set-uid": f"os.chmod({str(program)!r}, 0o4755)",
        # Its own files too: nothing a conversion writes needs a bit beyond the owner's.
        "own file set-uid": "os.fchmod(os.open('own', os.O_CREAT | os.O_WRONLY, 0o700), 0o4700)",
        "own file private": "open('mine', 'w').close() or os.chmod('mine', 0o600)",
        "owner": f"os.chown({str(secret)!r}, 0, 0)",
        "times": f"os.utime({str(secret)!r}, (0, 0))",
        "attribute": f"os.setxattr({str(secret)!r}, 'user.joey', b'x')",
        "attribute removed": f"os.removexattr({str(secret)!r}, 'user.joey')",
        # The registry's limits (a CPU limit below what it used kills it): harmless if it went through.
        "registry's limit": f"resource.prlimit(os.getppid(), resource.RLIMIT_CORE, (0, {core[1]}))",
        "own limit": "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))",
        # Other processes of the host uid: children given to the registry (zombies it never reaps), its
        # scheduling (reported done, not made), System V shared memory outliving the child (a key the host
        # is checked for below), a host file's flags and a lease on it, watches on directories.
        "child of the registry": "checked(libc.syscall(syscall_number('clone'), 0x8000 | 17, 0, 0, 0, 0))",
        "registry's affinity": "os.sched_setaffinity(os.getppid(), {0})",
        "registry's priority": "os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
        "shared memory segment": f"checked(libc.shmget({SHM_KEY}, 4096, 0o1600)) >= 0",
        "file flags": (
            "__import__('fcntl').ioctl(fd := os.open(os.__file__, os.O_RDONLY), 0x40086602,"
            " __import__('fcntl').ioctl(fd, 0x80086601, bytes(4)))"
        ),
        "lease": "__import__('fcntl').fcntl(os.open(os.__file__, os.O_RDONLY), 1024, 0)",
        # The kernel reads a command's low 32 bits only.
        "lease, high bits": (
            "checked(libc.syscall(syscall_number('fcntl'), os.open(os.__file__, os.O_RDONLY),"
            " (1 << 32) | 1024, 0))"
        ),
        "file version": (
            "__import__('fcntl').ioctl(fd := os.open(os.__file__, os.O_RDONLY), 0x40086604,"
            " __import__('fcntl').ioctl(fd, 0x80086603, bytes(8)))"
        ),
        "uid's priority": "os.setpriority(os.PRIO_USER, 0, 19)",
        "watch": "checked(libc.inotify_init1(0))",
        "other user's shared memory": f"open({str(others)!r}).read()",
        "own shared memory": f"open({str(own)!r}).read()",
        "list shared memory": "os.listdir('/dev/shm')",
        "list devices": "os.listdir('/dev')",
        "random": "len(open('/dev/urandom', 'rb').read(16))",
        "zero": "open('/dev/zero', 'rb').read(2)",
        "null": "open('/dev/null', 'r+b').write(b'discarded')",
        "path secret": f"open({str(added / 'secret.txt')!r}).read()",
        "list path entry": f"os.listdir({str(added)!r})",
        "limits": (
            "sorted((line[:26].strip(), line[26:].split()[:2]) for line in open('/proc/self/limits')"
            " if line.startswith(('Max processes', 'Max file size')))"
        ),
        # Unbuffered: the first write is cut at the limit, the next one fails.
        "write": "(out := open('scratch', 'wb', buffering=0)).write(bytes(1 << 20)) + out.write(b'x')",
    }
    limited = Conversions(4096, 60, 120, 1, 1 << 24, max_file_bytes=1 << 20, max_processes=64)
    staging = staging_of(tmp_path)
    try:
        with pytest.raises(InvalidArgument, match="PROBED ") as refused:
            limited.start("sklearn", payload(tmp_path, probe_code(**attempts)), (), None, staging)
    finally:
        others.unlink()
        own.unlink()
    denied, not_permitted = ["error", "Permission denied"], ["error", "Operation not permitted"]
    assert probed(str(refused.value)) == NO_HOST_POWER | {
        "other user's shared memory": denied,
        "own shared memory": denied,
        "list shared memory": denied,
        "list devices": denied,
        "random": ["ok", "16"],
        "zero": ["ok", "b'\\x00\\x00'"],
        "null": ["ok", "9"],
        "path secret": denied,
        "list path entry": denied,
        # RLIMIT_NPROC as the kernel holds it: a root registry's child is exempt from it all the same.
        "limits": ["ok", str([("Max file size", ["1048576", "1048576"]), ("Max processes", ["64", "64"])])],
        "write": ["error", "File too large"],
        # A mode change is reported done and not made (the modes are checked below).
        "readable by all": ["ok", "None"],
        "set-uid": ["ok", "None"],
        "own file set-uid": ["ok", "None"],
        "own file private": ["ok", "None"],
        "child of the registry": not_permitted,
        "registry's affinity": ["ok", "None"],
        "registry's priority": ["ok", "None"],
        "shared memory segment": ["ok", "True"],
        "file flags": not_permitted,
        "lease": not_permitted,
        "lease, high bits": not_permitted,
        "file version": not_permitted,
        "uid's priority": ["ok", "None"],
        "watch": not_permitted,
        "owner": not_permitted,
        "times": not_permitted,
        "attribute": not_permitted,
        "attribute removed": not_permitted,
        "registry's limit": not_permitted,
        "own limit": ["ok", "None"],
    }
    assert {path: (path.stat().st_mode, path.stat().st_mtime_ns) for path in (secret, program)} == metadata
    assert os.listxattr(secret) == []
    assert resource.getrlimit(resource.RLIMIT_CORE) == core
    assert (os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)) == scheduling
    # The segment lived in the child's own IPC namespace, gone with it.
    assert f"{SHM_KEY:>10} " not in Path("/proc/sysvipc/shm").read_text()
    # The registry converts the next upload as ever.
    conversion = limited.start("sklearn", payload(tmp_path, ""), (), None, staging)
    assert conversion.finish()[1][0] == "loaded a scikit-learn LinearRegression of 2 features"
    conversion.remove()


@pytest.mark.parametrize("denied", [(), ("capset",)])
def test_without_user_namespaces_a_root_child_drops_every_capability_or_is_refused(
    tmp_path: Path, denied: tuple[str, ...]
) -> None:
    # A registry where user namespaces are refused (a container's seccomp profile does that): root then
    # makes the network namespace alone, and gives up its capabilities before opening the file; a child
    # that could not (capset refused too) would still hold them, and is refused before it opens it.
    script = f"""
import errno
from pathlib import Path
import pyseccomp
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
new_user = pyseccomp.Arg(0, pyseccomp.MASKED_EQ, 0x10000000, 0x10000000)  # CLONE_NEWUSER
rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare", new_user)
for name in {denied!r}:
    rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
rules.load()
from joey_registry.conversion import ConversionFailed, Conversions
from joey_registry.errors import FailedPrecondition, InvalidArgument
folder = Path({str(tmp_path)!r})
try:
    Conversions(4096, 60, 120, 1, 1 << 24).start("sklearn", folder / "probe.pkl", (), None, folder)
except (InvalidArgument, FailedPrecondition) as exc:
    print(type(exc).__name__, str(exc))
"""
    (tmp_path / "probe.pkl").write_bytes(pickle.dumps(Payload(probe_code(**HOST_POWERS))))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    kind, message = done.stdout.split(" ", 1)
    if not denied:
        assert (kind, probed(message)) == ("InvalidArgument", NO_HOST_POWER)
        return
    assert kind == "FailedPrecondition"
    assert message.startswith(
        "the conversion sandbox could not be set up: capabilities not dropped: uid 0 holds CapEff "
    )
    assert message.rstrip().endswith(
        "(capset: Operation not permitted); nothing was stored (JOEY_CONVERSION_REQUIRE_SANDBOX=false "
        "converts unconfined)"
    )


# Replies the file's code writes to the reply channel (the child's first descriptor of its own) before
# the child's own: a description that is no text, a log that is no list of lines, a log claiming a
# conversion that left a directory where the ONNX file goes, and refusals of its own.
FORGED = {
    "loaded": ['{"loaded": 5, "notes": []}'],
    "converted": ['{"loaded": "a model", "notes": []}', '{"converted": "verified: exact, trust me"}'],
    "directory": ['{"loaded": "a model", "notes": []}', '{"converted": ["verified: exact"]}'],
    # Text the client would refuse (a status message beyond gRPC's 16 KiB), and text over two lines.
    "long refusal": [json.dumps({"refused": "x" * 9000})],
    "refusal over lines": [json.dumps({"refused": "one\nERROR forged log line"})],
}
REFUSED_AT_LOAD = {
    "loaded": "the conversion's reply is malformed: Loaded.loaded: Input should be a valid string",
    "long refusal": "the conversion's reply is malformed: Refused.refused: String should have at most 8000 "
    "characters",
    "refusal over lines": "one\\nERROR forged log line",
}
FORGED_FAILURE = {
    "converted": "the conversion's reply is malformed: Converted.converted: Input should be a valid array",
    "directory": "the conversion's output is not a regular file of its own (a link, a directory?)",
}


def _open_beneath(folder: Path) -> list[str]:
    """This process's descriptors open on a file beneath ``folder``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed meanwhile
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/"):
                found.append(fd)
    return found


@pytest.mark.parametrize("forged", FORGED)
def test_a_reply_of_any_other_shape_is_refused(conversions: Conversions, tmp_path: Path, forged: str) -> None:
    lines = "".join(line + "\n" for line in FORGED[forged]).encode()
    made = "os.mkdir('model.onnx')\n" if forged == "directory" else ""
    code = f"import os\n{made}os.write(3, {lines!r})\n"
    if forged in REFUSED_AT_LOAD:
        with pytest.raises(InvalidArgument) as refused:
            conversions.start("sklearn", payload(tmp_path, code), (), None, staging_of(tmp_path))
        assert str(refused.value) == f"{REFUSED_AT_LOAD[forged]}; nothing was stored"
        return
    conversion = conversions.start("sklearn", payload(tmp_path, code), (), None, staging_of(tmp_path))
    assert conversion.description == "a model"
    with pytest.raises(ConversionFailed) as failed:
        conversion.finish()
    assert str(failed.value) == FORGED_FAILURE[forged]
    assert _open_beneath(conversion.workdir) == []
    conversion.remove()
