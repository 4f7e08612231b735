"""The ``edgescope`` command: export, serve, stream, models, top, validate, engines, sign, keygen.

Heavy imports happen inside each command, so ``edgescope serve`` on a device
never loads torch and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgescope.commands import (
    audit,
    doctor,
    engines,
    export,
    keygen,
    models,
    outbox,
    perf,
    serve,
    sign,
    stream,
    top,
    validate,
)
from edgescope.commands.serve import backend_for as _backend  # noqa: F401  (tests/test_config.py imports it from here)
from edgescope.errors import EdgescopeError

if TYPE_CHECKING:
    import grpc


def _rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    import grpc

    # What gRPC raises (sync and asyncio) carries the call's status.
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return exc.code(), exc.details() or ""
    return None


def _error_line(command: str, exc: BaseException, args: argparse.Namespace) -> str:
    """One line that says what went wrong and what to do about it."""
    import grpc

    if isinstance(exc, EdgescopeError):
        return f"edgescope {command}: error: {exc}"
    status = _rpc_status(exc)
    if status is not None:
        code, details = status
        target = getattr(args, "target", "the server")
        if code == grpc.StatusCode.UNAVAILABLE:
            return (
                f"edgescope {command}: error: no server answers at {target} ({details}); "
                "start one with `edgescope serve`, or point --target at it"
            )
        return f"edgescope {command}: error: {target} answered {code.name}: {details}"
    if isinstance(exc, OSError):
        return f"edgescope {command}: error: {exc} (check the path, its permissions, or the address and port)"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"edgescope {command}: error: unexpected {type(exc).__name__}: {first} "
        "(rerun with --debug for the full traceback, and report it)"
    )


def build_parser() -> argparse.ArgumentParser:
    from edgescope import __version__

    parser = argparse.ArgumentParser(prog="edgescope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgescope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        export.add,
        serve.add,
        stream.add,
        models.add,
        top.add,
        validate.add,
        engines.add,
        sign.add,
        keygen.add,
        doctor.add,
        audit.add,
        outbox.add,
        perf.add,
    ):
        add(commands)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (``serve``), for the options it takes."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = commands.choices[command]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # Our own progress at INFO; libraries (the ONNX exporter is chatty) only warn.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("edgescope").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    runners = {
        "export": export.run,
        "serve": serve.run,
        "stream": stream.run,
        "models": models.run,
        "top": top.run,
        "validate": validate.run,
        "engines": engines.run,
        "sign": sign.run,
        "keygen": keygen.run,
        "doctor": doctor.run,
        "audit": audit.run,
        "outbox": outbox.run,
        "perf": perf.run,
    }
    try:
        if args.command == "serve":
            args = serve.with_config(args, parser, command_parser(parser, "serve"), argv)
        return runners[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`edgescope doctor | head`): stop quietly, and keep the exit flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, asyncio.CancelledError) as exc:
        # CancelledError: a call gRPC gave up on (the server went away mid-stream); one line all the same.
        if args.debug:
            traceback.print_exc()
        print(_error_line(args.command, exc, args), file=sys.stderr)
        # 2: the request or its inputs are wrong (edgescope's own errors); 1: something failed on the way.
        return 2 if isinstance(exc, EdgescopeError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
