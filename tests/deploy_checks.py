"""What deploy/ relies on: the serve flags it may pass, and the PromQL it runs (dashboard and alert rules)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "edgescope-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Labels Prometheus adds at scrape time; the runtime never exports them.
TARGET_LABELS = frozenset({"job", "instance"})
_SELECTOR = re.compile(r"\b(edgescope_[a-z0-9_]+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@cache
def serve_flags() -> frozenset[str]:
    """Every flag `edgescope serve` takes, by its help, plus the agreed ones above."""
    help_text = subprocess.run(
        [sys.executable, "-m", "edgescope.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return frozenset(re.findall(r"--[a-z][a-z-]+", help_text))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_exprs() -> list[str]:
    """Every panel target's expression and every query variable's query."""
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {m.group(1) for expr in exprs for m in _SELECTOR.finditer(expr)}


def selectors(exprs: list[str]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value)]) for every selector written as ``edgescope_x{...}``."""
    found = []
    for expr in exprs:
        for m in _SELECTOR.finditer(expr):
            found.append((m.group(1), _MATCHER.findall(m.group(2) or "")))
    return found
