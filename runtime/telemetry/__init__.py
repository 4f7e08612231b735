"""Device telemetry: GPU health through NVML, reported plainly when absent."""
