"""``edgescope stream --results-to URL``: what the client adds to the archive's recorders (``archive.recorders``).

The recorders code each label as the bundle the results came from codes it;
the client asks the server for those codes (GetModel, when the stream ends)
and uses them only when the server still serves the bundle the results came
from, else the writers' own rules apply.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from edgescope.runtime.archive.recorders import LabelCodesFor
from edgescope.runtime.archive.seg import Code, label_codes_of
from edgescope.runtime.transport import ClientSecurity, sync_channel
from edgescope.v1 import stream_pb2, stream_pb2_grpc


def dicom_source(spec: str) -> Path | None:
    """The file a ``dicom:PATH[?options]`` source reads; None for any other source."""
    scheme, _, rest = spec.partition(":")
    if scheme.strip().lower() != "dicom":
        return None
    return Path(rest.partition("?")[0]).expanduser()


def bundle_label_codes(
    target: str, security: ClientSecurity | None, provenance: stream_pb2.Provenance, timeout_s: float = 5.0
) -> tuple[dict[str, tuple[Code, Code]], str]:
    """The label codes of the bundle the results came from, asked of the server (GetModel), and where the
    labels' codes came from in words; no codes when the server cannot say, or now serves another bundle."""
    if not target or not provenance.model:
        return {}, "default rule (no server to ask for the bundle's label codes)"
    try:
        with sync_channel(target, security or ClientSecurity()) as channel:
            info = stream_pb2_grpc.StreamServiceStub(channel).GetModel(
                stream_pb2.GetModelRequest(name=provenance.model), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return {}, f"default rule (GetModel {provenance.model}: {exc.code().name}: {exc.details()})"
    if provenance.sha256 and info.provenance.sha256 and info.provenance.sha256 != provenance.sha256:
        return {}, f"default rule (the server now serves another bundle of {provenance.model})"
    codes = label_codes_of(info.manifest)
    return codes, "bundle" if codes else "default rule (the bundle gives no label codes)"


def server_label_codes(target: str, security: ClientSecurity | None) -> LabelCodesFor:
    """Asks the server at ``target`` for the label codes of the bundle a recorder's results came from."""
    return lambda provenance: bundle_label_codes(target, security, provenance)
