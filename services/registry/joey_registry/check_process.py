"""The child process an upload is checked in, apart from the registry.

Loading an untrusted model (onnxruntime, onnx's shape inference, or parsing a python step) can take any
amount of memory or time, or crash: here that costs this process only. The registry starts one per
upload, ahead of it (``python -s -P -m joey_registry.check_process``, spawned with a minimal environment:
no secret, no database URL, the registry's sys.path as PYTHONPATH); this process imports the validators,
waits for one request on its stdin, limits itself before it reads the file, checks, and writes one
reply to stdout. The CPU limit counts from the request: the imports done while waiting are not the
upload's.

Request: ``{"framework", "path", "inputs", "outputs", "memory_mb", "cpu_s"}``, tensor specs in their JSON
form (``TensorSpec.to_json``). Reply: ``{"inputs": [...], "outputs": [...]}`` (the signature) or
``{"refused": reason}``. Running out of memory exits with :data:`EXIT_MEMORY`; the CPU limit ends the
process with SIGXCPU.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

from joey_core.models import specs_from_json
from joey_registry.errors import InvalidArgument
from joey_registry.validation import Signature, validator_for

EXIT_MEMORY = 3
_MB = 1 << 20


def confine(memory_mb: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * _MB, memory_mb * _MB))
    # SIGXCPU at the soft limit, SIGKILL a second later at the hard one; RLIMIT_CPU counts the process's
    # whole life, so the limit starts from what it used so far.
    used = resource.getrusage(resource.RUSAGE_SELF)
    start = math.ceil(used.ru_utime + used.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (start + cpu_s, start + cpu_s + 1))
    # A check writes no file, and leaves no core dump of the model behind.
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Under load the registry's own calls go first, and under memory pressure the kernel kills a check
    # before the registry (raising one's own OOM score needs no privilege).
    os.nice(10)
    with open("/proc/self/oom_score_adj", "w") as score:
        score.write("1000")


def _check(request: dict[str, Any]) -> dict[str, Any]:
    declared = Signature(specs_from_json(request["inputs"]), specs_from_json(request["outputs"]))
    validator = validator_for(request["framework"], request["memory_mb"] * _MB)
    try:
        signature = validator.inspect(Path(request["path"]), declared)
    except InvalidArgument as exc:
        return {"refused": str(exc)}
    return {
        kind: [s.to_json() for s in specs]
        for kind, specs in (("inputs", signature.inputs), ("outputs", signature.outputs))
    }


def main() -> None:
    data = sys.stdin.buffer.read()
    if not data:
        return  # started ahead for an upload that never came: the registry stopped
    request = json.loads(data)
    confine(request["memory_mb"], request["cpu_s"])
    try:
        reply = _check(request)
    except MemoryError:
        os._exit(EXIT_MEMORY)  # writing a reply could need memory too
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    main()
