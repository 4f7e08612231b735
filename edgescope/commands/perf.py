"""``edgescope perf``: a running server's latency and throughput under load."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from edgescope.commands.options import DEFAULT_TARGET, add_client_security, client_security, floats


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated whole numbers, e.g. 1,2,4") from exc


def _shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be NAME:D1,D2,... (sizes without the batch), e.g. image:1,512,512"
        )
    return name, _ints(dims)


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "perf",
        help="measure a running server's latency and throughput under load (like perf_analyzer)",
        description="Sweep concurrency (or request rate) against a running server; per step, after a warm-up, "
        "measure windows until they agree, then report throughput and latency percentiles.",
    )
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--model", required=True)
    p.add_argument("--protocol", choices=["kserve", "stream"], default="kserve", help="ModelInfer or edgescope Stream")
    p.add_argument("--concurrency", type=_ints, default=[1], metavar="N,N,...", help="outstanding requests per step")
    p.add_argument("--request-rate", type=floats, default=[], metavar="R,R,...", help="requests/s per step instead")
    p.add_argument("--distribution", choices=["constant", "poisson"], default="constant", help="request-rate spacing")
    p.add_argument("--batch-size", type=int, default=1, help="kserve: rows per request")
    p.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME:D1,D2",
                   help="kserve: sizes of an input's dynamic dimensions (without the batch)")  # fmt: skip
    p.add_argument("--source", default="synthetic:ultrasound", help="stream: the frames to send")
    p.add_argument("--stream-lanes", type=int, default=4, help="stream: streams that carry request-rate steps")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=2.0, help="length of one measurement window")
    p.add_argument("--stability", type=float, default=10.0, help="windows agree within this percentage")
    p.add_argument("--max-windows", type=int, default=10, help="windows per step before giving up on stability")
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--json", type=Path, help="write every step as JSON")
    p.add_argument("--csv", type=Path, help="write one row per step as CSV")
    p.add_argument("--plot", type=Path, help="write latency against throughput as PNG (needs matplotlib)")
    add_client_security(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.client.perf import format_table, run_perf, write_csv, write_json, write_plot
    from edgescope.runtime.client.perf_options import PerfOptions

    options = PerfOptions(
        target=args.target,
        model=args.model,
        protocol=args.protocol,
        concurrency=args.concurrency,
        request_rates=args.request_rate,
        distribution=args.distribution,
        batch_size=args.batch_size,
        shapes=dict(args.shape),
        source=args.source,
        stream_lanes=args.stream_lanes,
        warmup_s=args.warmup_s,
        window_s=args.window_s,
        stability=args.stability / 100.0,
        max_windows=args.max_windows,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        security=client_security(args),
    )
    print(f"perf: {args.model} over {args.protocol} at {args.target}")
    results = asyncio.run(run_perf(options))
    print(format_table(results))
    if args.json is not None:
        write_json(results, options, args.json)
        print(f"json: {args.json}")
    if args.csv is not None:
        write_csv(results, args.csv)
        print(f"csv: {args.csv}")
    if args.plot is not None:
        print(f"plot: {args.plot}" if write_plot(results, options, args.plot) else "plot: skipped (no matplotlib)")
    return 1 if any(step.errors for step in results) else 0
