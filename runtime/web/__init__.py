"""The built-in telemetry web page and Prometheus endpoint."""
