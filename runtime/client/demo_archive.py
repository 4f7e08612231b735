"""The archive demo: a cine's results stored as DICOM in a local Orthanc, and read back from it.

Starts Orthanc on loopback with a temporary storage directory
(``edgescope.runtime.archive.local_orthanc``) and ``edgescope serve`` with
the bundle, streams the DICOM source with ``edgescope stream --results-to``
(STOW-RS, through the outbox), then lists what the archive holds, read back
through its REST API, and writes that with the stream's summary. Stops both
processes it started, by their ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgescope.runtime.archive.local_orthanc import LocalOrthanc, orthanc_missing
from edgescope.runtime.client.demo import start_server, stop_server

SHOWN_TAGS = ("Modality", "SOPClassUID", "SeriesDescription", "StudyInstanceUID", "NumberOfFrames")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--source", required=True, help="a dicom: source")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()
    missing = orthanc_missing()
    if missing:
        print(f"the archive demo needs a local archive: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, LocalOrthanc.on_free_ports(Path(tmp) / "orthanc") as archive:
        print(f"Orthanc on 127.0.0.1: DICOMweb {archive.stow}, C-STORE {archive.c_store}")
        server, target = start_server([args.bundle], Path(tmp) / "port")
        stream_summary = Path(tmp) / "stream.json"
        try:
            run = subprocess.run(
                [sys.executable, "-m", "edgescope.cli", "stream", "--source", args.source, "--target", target,
                 "--frames", str(args.frames), "--results-to", archive.stow, "--outbox", str(Path(tmp) / "outbox"),
                 "--summary", str(stream_summary)],
                check=False,
            )  # fmt: skip
        finally:
            stop_server(server)
        stored = archive.instances()
    for instance in stored:
        print("stored: " + ", ".join(f"{tag} {instance.get(tag, '-')}" for tag in SHOWN_TAGS))
    summary = {
        "stream": json.loads(stream_summary.read_text(encoding="utf-8")) if stream_summary.exists() else None,
        "archive": [{tag: instance.get(tag) for tag in SHOWN_TAGS} for instance in stored],
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"summary: {args.summary}")
    return 0 if run.returncode == 0 and stored else 1


if __name__ == "__main__":
    raise SystemExit(main())
