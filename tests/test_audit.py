"""The audit trail: every record chained to the one before, any change shown, and what the server records."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError, EdgescopeError
from edgescope.runtime.archive.audit import AuditTrail, record_results, verify
from edgescope.runtime.server.security import SecurityConfig
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread


def _trail(path: Path, count: int) -> None:
    trail = AuditTrail(path)
    for index in range(count):
        trail.append("model_loaded", model=f"m{index}", by="token:abc")
    trail.close()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _audit_verify(path: Path) -> subprocess.CompletedProcess[str]:
    """``edgescope audit verify PATH``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "audit", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_untouched_trail_verifies_and_resumes_where_it_ended(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path, 3)
    _trail(path, 2)  # a restart continues the chain
    verdict = verify(path)
    assert verdict.intact and verdict.records == 5
    assert [json.loads(line)["seq"] for line in _lines(path)] == [0, 1, 2, 3, 4]
    assert verdict.last_hash == json.loads(_lines(path)[-1])["hash"]


@pytest.mark.parametrize("tamper", ["change", "remove", "reorder", "insert"])
def test_any_change_removal_or_reordering_is_found(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    _trail(path, 4)
    lines = _lines(path)
    if tamper == "change":
        record = json.loads(lines[1])
        record["model"] = "another"
        lines[1] = json.dumps(record) + "\n"
    elif tamper == "remove":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.insert(2, lines[1])
    path.write_text("".join(lines), encoding="utf-8")
    verdict = verify(path)
    assert not verdict.intact and ("line 2" in verdict.problem or "line 3" in verdict.problem)
    # A trail that does not verify is not appended to: it is kept as evidence.
    with pytest.raises(ConfigError, match="does not verify"):
        AuditTrail(path)
    run = _audit_verify(path)
    assert run.returncode == 1 and "NOT intact" in run.stderr


def test_the_server_records_loads_refusals_and_unloads_with_who_asked(tmp_path: Path, example_bundle: Bundle) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(example_bundle.path, repository / "lesion-unet")
    audit = tmp_path / "audit.jsonl"
    served = ServerThread(
        [repository / "lesion-unet"], security=SecurityConfig(model_repository=repository), audit_log=audit
    )
    try:
        with grpc.insecure_channel(served.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            stub.LoadModel(stream_pb2.LoadModelRequest(bundle="lesion-unet", name="second"), timeout=60)
            with pytest.raises(grpc.RpcError):
                stub.LoadModel(stream_pb2.LoadModelRequest(bundle="no-such-entry"), timeout=60)
            stub.UnloadModel(stream_pb2.UnloadModelRequest(name="second"), timeout=10)
    finally:
        served.stop()
    records = [json.loads(line) for line in _lines(audit)]
    events = ["server_started", "model_loaded", "model_loaded", "model_refused", "model_unloaded", "server_stopped"]
    assert [r["event"] for r in records] == events
    started, start, loaded, refused, unloaded, _ = records
    assert started["by"] == "server" and started["version"]
    assert start["by"] == "server" and start["sha256"] == example_bundle.onnx_sha256
    # Who asked: the credential and host of the call (anonymous on loopback here), never a patient.
    assert loaded["by"].startswith("anonymous@") and loaded["model"] == "second"
    assert refused["by"] == loaded["by"] and "no-such-entry" in refused["reason"]
    assert unloaded["model"] == "second"
    run = _audit_verify(audit)
    assert run.returncode == 0 and "6 record(s), intact" in run.stdout


def test_a_delivery_is_recorded_object_by_object_without_secrets_in_the_url(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit.jsonl")
    report = {
        "to": "dicomweb+https://ops:s3cret@pacs.example:443/dicom-web?ca=/etc/site-ca.pem&key=/etc/device.key",
        "written": [{"sop_class": "Segmentation", "sop_instance_uid": "1.2.3"}],
        "delivered": [],
        "waiting": 1,
        "error": "STOW-RS to https://pacs.example/dicom-web failed: timed out",
    }
    record_results(trail, report, by="client", model="lesion-unet")
    trail.close()
    written, waiting = (json.loads(line) for line in _lines(tmp_path / "audit.jsonl"))
    assert written["event"] == "archive_object_written" and written["sop_instance_uid"] == "1.2.3"
    assert written["model"] == "lesion-unet" and written["by"] == "client"
    assert waiting["event"] == "archive_delivery_waiting" and waiting["waiting"] == 1
    assert "timed out" in waiting["reason"]
    assert waiting["to"] == "dicomweb+https://ops@pacs.example:443/dicom-web"


def test_a_start_that_fails_is_recorded_with_why(tmp_path: Path) -> None:
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.app import ServerConfig, start_server

    audit = tmp_path / "audit.jsonl"
    config = ServerConfig(bundles=[tmp_path / "no-such-bundle"], host="127.0.0.1", port=0, audit_log=audit)
    with pytest.raises(EdgescopeError):
        asyncio.run(start_server(config, OnnxRuntimeBackend(intra_op_threads=1)))
    records = [json.loads(line) for line in _lines(audit)]
    assert [r["event"] for r in records] == ["server_started", "model_refused", "server_start_failed"]
    assert "no-such-bundle" in records[-1]["reason"] and verify(audit).intact
