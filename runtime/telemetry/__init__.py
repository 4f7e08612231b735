"""Telemetry that measures: device health (NVML, tegrastats, psutil), latency recorders, alerts, and
``RuntimeMetrics``, which records every answer and reports it. It imports neither the server nor the
web page: ``edgescope.runtime.server.telemetry`` wires it into the server and answers the Telemetry
call, ``edgescope.runtime.web`` serves the page and ``/metrics``, and ``edgescope top`` reads it."""
