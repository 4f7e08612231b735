"""``edgescope top``: a live terminal view of a server's Telemetry stream (rich)."""

from __future__ import annotations

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgescope.errors import EdgescopeError
from edgescope.runtime.transport import ClientSecurity, sync_channel
from edgescope.v1 import telemetry_pb2, telemetry_pb2_grpc

GIB = 1024**3


def _group_table(group: telemetry_pb2.LatencyGroup) -> Table:
    drops = ", ".join(f"{d.reason} {d.count}" for d in group.drops) or "0"
    who = f"{group.model} stream {group.stream_id}" if group.stream_id else f"{group.model} (all streams)"
    table = Table(
        title=f"{who}: {group.frames} frames  {group.fps:.1f} fps  drops {drops}  "
        f"deadline misses {group.deadline_misses}  errors {group.errors}",
        title_justify="left",
    )
    for name in ("stage ms", "count", "p50", "p90", "p99", "p99.9", "max", "jitter"):
        table.add_column(name, justify="left" if name == "stage ms" else "right")
    for s in group.stages:
        values = (s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.jitter_ms)
        table.add_row(s.stage, str(s.count), *(f"{v:.2f}" for v in values))
    return table


def _device_view(device: telemetry_pb2.DeviceHealth) -> list[Table | Text]:
    host = device.host
    parts: list[Table | Text] = [
        Text(f"device: {device.gpu_status}", style="bold"),
        Text(
            f"CPU {host.cpu_percent:.0f}%  host memory {host.memory_used_bytes / GIB:.2f}/"
            f"{host.memory_total_bytes / GIB:.2f} GiB  server RSS {host.process_rss_bytes / 2**20:.0f} MiB  "
            f"sample cost {device.sample_cost_us:.0f} us"
        ),
    ]
    if not device.gpus:
        return parts
    table = Table()
    for name in ("gpu", "util %", "mem GiB", "ours GiB", "temp C", "power W", "SM MHz", "throttle"):
        table.add_column(name, justify="left" if name in ("gpu", "throttle") else "right")
    for g in device.gpus:
        table.add_row(
            f"{g.index} {g.name}",
            f"{g.utilization_percent:.0f}",
            f"{g.memory_used_bytes / GIB:.1f}/{g.memory_total_bytes / GIB:.1f}",
            f"{g.process_memory_bytes / GIB:.2f}",
            f"{g.temperature_c:.0f}",
            f"{g.power_w:.0f}/{g.power_limit_w:.0f}",
            f"{g.sm_clock_mhz:.0f}",
            ", ".join(g.throttle_reasons) or "-",
        )
    return [*parts, table]


def render(snapshot: telemetry_pb2.TelemetrySnapshot) -> Group:
    parts: list[Table | Text] = [Text(f"ALERT {a.message}", style="bold red") for a in snapshot.alerts]
    if not snapshot.models:
        parts.append(Text("no frames yet", style="dim"))
    parts += [_group_table(g) for g in (*snapshot.models, *snapshot.streams)]
    parts += _device_view(snapshot.device)
    return Group(*parts)


def run_top(
    target: str,
    interval_s: float,
    count: int | None,
    console: Console | None = None,
    security: ClientSecurity | None = None,
) -> None:
    """Show snapshots until interrupted, or ``count`` of them (then print the last one plainly)."""
    console = console or Console()
    request = telemetry_pb2.TelemetryRequest(interval_s=interval_s)
    try:
        with sync_channel(target, security or ClientSecurity()) as channel:
            stream = telemetry_pb2_grpc.TelemetryServiceStub(channel).Telemetry(request)
            if count is not None:
                last = None
                for seen, snapshot in enumerate(stream, start=1):
                    last = snapshot
                    if seen >= count:
                        break  # leaving the channel's block cancels the call
                if last is not None:
                    console.print(render(last))
                return
            with Live(console=console, auto_refresh=False) as live:
                for snapshot in stream:
                    live.update(render(snapshot), refresh=True)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return
        raise EdgescopeError(f"telemetry from {target} failed: {exc.code().name}: {exc.details()}") from exc
