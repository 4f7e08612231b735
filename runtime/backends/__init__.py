"""Inference backends behind one contract (see ``base``)."""

from edgescope.runtime.backends.base import Backend, Session, SessionCapabilities

__all__ = ["Backend", "Session", "SessionCapabilities"]
