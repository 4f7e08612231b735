"""What both ends of a gRPC connection must agree on: message limits."""

from __future__ import annotations

# gRPC's 4 MiB default is smaller than one 1080p RGB frame (6 MB); 64 MiB fits
# a raw 4K RGB 16-bit frame (50 MB) with room for the envelope.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits set on both ends, so neither side falls back to 4 MiB."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
