#!/usr/bin/env bash
# One prepared check of everything that needs an NVIDIA GPU, for the first machine that has one.
#
#   bash scripts/gpu_check.sh [REPORT.json]        (default: out/gpu_check/report.json)
#
# Steps, each bounded in time and recorded whatever its outcome:
#   1. environment: a virtual environment that sees the machine's own CUDA packages
#      (torch, cupy, cuda-python, nvidia-ml-py), edgescope installed into it
#      (from $WHEELHOUSE when the machine has no package index);
#   2. every `gpu`-marked test (CUDA adapter, NVML telemetry, TensorRT runner where TensorRT is);
#   3. NVML telemetry: one device sample as the server takes it;
#   4. ONNX Runtime on CUDA: a bundle's golden-frame self-test on the CUDA provider (the bundle in
#      $GPU_CHECK_BUNDLE, e.g. carried from a machine with torch; needs onnxruntime-gpu; skipped otherwise);
#   5. a GPU latency benchmark: the example model through the CUDA adapter's buffers and stream.
# The whole run stays under 8 minutes; the report is one JSON file.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-out/gpu_check/report.json}
WORK=$(dirname "$REPORT")
mkdir -p "$WORK"
VENV=${GPU_CHECK_VENV:-$WORK/venv}
PY=$VENV/bin/python
STEPS=$WORK/steps
rm -rf "$STEPS" && mkdir -p "$STEPS"

step() {  # step NAME SECONDS COMMAND...: run, keep its output and exit status
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" >"$STEPS/$name.log" 2>&1
    local status=$?
    printf '%s %s %s\n' "$name" "$status" "$((SECONDS - start))" >>"$STEPS/status"
    echo "== $name: exit $status ($((SECONDS - start)) s)"
}

# The machine's torch stays: nothing here may replace it with another build.
SOURCE=""
[ -n "${WHEELHOUSE:-}" ] && SOURCE="--no-index --find-links $WHEELHOUSE"
step setup 240 bash -c "python3 -m venv --system-site-packages '$VENV' && '$PY' -m pip install --quiet $SOURCE -e '.[test]'"
step gpu_tests 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step nvml 30 "$PY" - <<'EOF'
import json
from edgescope.runtime.telemetry.device import DeviceSampler
sampler = DeviceSampler(1.0, lambda sample: None)
sample = sampler.sample()
sampler.close()
print(json.dumps({"gpu_source": sample.gpu_source, "gpu_status": sample.gpu_status,
                  "gpus": [g.name for g in sample.gpus], "cost_us": sample.cost_ns / 1000}))
assert sample.gpus, "NVML found no GPU"
EOF
step ort_cuda_self_test 120 "$PY" - <<'EOF'
import json, os, sys
from pathlib import Path
import onnxruntime as ort
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print(json.dumps({"skipped": "onnxruntime-gpu is not installed here", "providers": ort.get_available_providers()}))
    sys.exit(0)
bundle_dir = Path(os.environ.get("GPU_CHECK_BUNDLE", "build/py310/lesion-unet"))
if not (bundle_dir / "manifest.json").is_file():
    print(json.dumps({"skipped": f"no bundle at {bundle_dir} (export one and set GPU_CHECK_BUNDLE)"}))
    sys.exit(0)
from edgescope.bundle import load_bundle
from edgescope.runtime.evaluation import format_self_test, onnxruntime_self_test
bundle = load_bundle(bundle_dir)
report = onnxruntime_self_test(bundle, providers=("CUDAExecutionProvider",))
print(format_self_test(report))
sys.exit(0 if report.passed else 1)
EOF
step gpu_latency 120 "$PY" - <<'EOF'
import json, time
import numpy as np
from edgescope.runtime.backends.cuda import CudaAdapter
# The adapter's own path per frame: pinned host buffer -> device -> host on its stream, 256x256 float.
cuda = CudaAdapter(0)
host = cuda.pinned_array((1, 1, 256, 256), np.float32)
device = cuda.device_buffer(host.nbytes)
times = []
for _ in range(500):
    start = time.perf_counter()
    cuda.to_device(device, host)
    cuda.to_host(host, device)
    cuda.synchronize()
    times.append((time.perf_counter() - start) * 1e3)
cuda.close()
times = np.asarray(times[50:])
print(json.dumps({"round_trip_256x256_fp32_ms": {"p50": float(np.percentile(times, 50)),
                                                 "p99": float(np.percentile(times, 99))}}))
EOF

# The report, written by whichever Python is there (the environment may not have been made).
REPORTER=$PY
[ -x "$REPORTER" ] || REPORTER=python3
"$REPORTER" - "$STEPS" "$REPORT" <<'EOF'
import json, platform, sys
from pathlib import Path
steps, report = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for line in (steps / "status").read_text().splitlines():
    name, status, seconds = line.split()
    log = (steps / f"{name}.log").read_text(errors="replace")
    results[name] = {"exit": int(status), "seconds": int(seconds), "log_tail": log[-4000:]}
report.write_text(json.dumps({"machine": platform.node(), "steps": results}, indent=2) + "\n")
print(f"report: {report}")
EOF
