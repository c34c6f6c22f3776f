"""Sniffing what a file that is not ONNX looks like (``joey_registry.validation.what_file_is``) stays cheap
for any upload: a small file that expands to gigabytes, a long run of protobuf fields, a huge JSON document
or an archive of many entries is described from a bounded read."""

from __future__ import annotations

import bz2
import lzma
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from joey_registry.validation import _ort_reason, what_file_is

ZEROS = bytes(8 << 20)
# Sniffing a file reads its head, 64 KiB; well beyond that would mean it read the file or expanded it.
BOUNDED = 1 << 20


def sniffed(path: Path) -> tuple[str | None, int]:
    """What ``path`` looks like, and the most memory sniffing it took."""
    tracemalloc.start()
    try:
        found = what_file_is(path)
        return found, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(1, wbits=31)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("kind", "compress"),
    [("gzip", gzip), ("bz2", bz2.compress), ("xz", lambda data: lzma.compress(data, preset=0))],
)
def test_a_compression_bomb_is_not_expanded(
    tmp_path: Path, kind: str, compress: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "bomb"
    path.write_bytes(compress(ZEROS))
    found, peak = sniffed(path)
    assert found == (
        f"this looks like a file compressed with {kind}: decompress it and upload the .onnx model itself"
    )
    assert peak < BOUNDED


def test_a_long_run_of_protobuf_fields_is_not_walked(tmp_path: Path) -> None:
    # ir_version 8, then half a million empty producer_name fields: more than any model has.
    path = tmp_path / "fields.onnx"
    path.write_bytes(b"\x08\x08" + b"\x12\x00" * (1 << 19))
    found, peak = sniffed(path)
    assert found is None
    assert peak < BOUNDED


@pytest.mark.parametrize(
    "data",
    [
        b"\x08\x96\x01\x3a" + b"\xff" * 8 + b"\x7f",  # ir_version 150
        b"\x08\x00\x3a\x05",  # ir_version 0
        b"\x08\x08\x90\x01\x05",  # field 18 is not a ModelProto field
        b"\x08\x08\x08\x08",  # ir_version twice
    ],
)
def test_a_binary_starting_like_protobuf_is_not_called_onnx(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "binary"
    path.write_bytes(data)
    assert what_file_is(path) is None


def test_an_onnx_file_whose_doc_string_holds_python_is_not_a_python_step(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    model = onnx.ModelProto(ir_version=8, doc_string="def process_data(inputs):\n    return inputs\n")
    path.write_bytes(model.SerializeToString())
    assert what_file_is(path) == (
        f"this looks like the start of an ONNX model without its graph ({path.stat().st_size} bytes): "
        "upload the complete file (was a download or copy interrupted?)"
    )


def test_a_huge_json_document_is_judged_by_its_head(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    with path.open("wb") as file:
        file.write(b'{"learner": {"gradient_booster": {"trees": [')
        file.truncate(64 << 20)  # sparse: cheap to write, as large to read
    found, peak = sniffed(path)
    assert found is not None
    assert found.startswith("this looks like an XGBoost model saved as JSON (it has xgboost's")
    assert peak < BOUNDED


def test_an_archive_of_many_entries_is_not_listed(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(10_001):
            archive.writestr(f"part-{index}", b"")
    found, peak = sniffed(path)
    assert found == "this is a zip archive of many files: upload the .onnx model itself"
    assert peak < BOUNDED


def test_an_onnxruntime_reason_tells_no_server_path() -> None:
    error = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /srv/joey/artifacts/staging/tmp1 failed: "
        "Node (n) Op (X) is not supported; see /onnxruntime_src/onnxruntime/core/graph/model.cc:149"
    )
    assert _ort_reason(error) == "Node (n) Op (X) is not supported; see model.cc:149"
