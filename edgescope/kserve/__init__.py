"""The Open Inference Protocol (KServe v2) messages, generated from proto/edgescope/kserve."""
