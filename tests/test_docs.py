"""The documentation site: it builds with --strict, every link in it resolves, its reference
lists every option of every command, and the README is a landing page whose links work."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("mkdocs", reason="the documentation tools come with the dev extra (make test installs them)")
pytest.importorskip("material", reason="the documentation tools come with the dev extra (make test installs them)")

from edgescope.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser, prefix: str = "edgescope") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and nested command, walked here rather than by the generator under test."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prefix} {name}", sub))
                found.extend(_commands(sub, f"{prefix} {name}"))
    return found


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif (name == "href" and tag in ("a", "link")) or (name == "src" and tag in ("img", "script")):
                self.links.append(value)


def _parse(path: Path) -> _Links:
    parsed = _Links()
    parsed.feed(path.read_text(encoding="utf-8"))
    return parsed


def test_the_site_builds_strictly_and_has_every_page(site: Path) -> None:
    for page in ("getting-started", "security", "telemetry", "reference/cli", "reference/proto", "api/export"):
        assert (site / page / "index.html").is_file(), page


def test_every_link_and_anchor_in_the_site_resolves(site: Path) -> None:
    pages = {path: _parse(path) for path in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # another site: not checked offline
            path = unquote(parts.path)
            # Absolute paths (the 404 page's) are from the site's root.
            base = site if path.startswith("/") else page.parent
            target = (base / path.lstrip("/")).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {link} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_option_of_every_command_is_in_the_built_reference(site: Path) -> None:
    parser = build_parser()
    commands = _commands(parser)
    assert {"edgescope serve", "edgescope audit verify", "edgescope outbox send"} <= {n for n, _ in commands}
    html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    missing = []
    for name, command in [("edgescope", parser), *commands]:
        if name != "edgescope" and not re.search(rf"<h\d[^>]*>{re.escape(name)}<", html):
            missing.append(f"{name} (no heading)")
        for option in _options(command):
            # Each option opens its entry, in code: <code>--port PORT</code> or <code>-v, --verbose</code>.
            if not re.search(rf"<code>(?:[^<]*, )?{re.escape(option)}(?:[ ,][^<]*)?</code>", html):
                missing.append(f"{name} {option}")
    assert not missing, "not in the command reference: " + ", ".join(missing)


def test_the_reference_covers_the_proto_messages_the_metrics_and_the_variables() -> None:
    pages = _generator().pages()
    proto = pages["reference/proto.md"]
    for path in sorted((ROOT / "proto").rglob("*.proto")):
        text = path.read_text(encoding="utf-8")
        for kind, name in re.findall(r"^\s*(message|enum|service)\s+(\w+)", text, flags=re.MULTILINE):
            assert re.search(rf"^### {kind} (\w+\.)*{name}$", proto, flags=re.MULTILINE), f"{path.name}: {kind} {name}"
    assert "`Stream(stream Frame) returns (stream Result)`" in proto
    metrics = pages["reference/metrics.md"]
    for name in ("edgescope_inference_success_total", "edgescope_stage_duration_seconds", "edgescope_gpu_throttle"):
        assert f"`{name}`" in metrics
    configuration = pages["reference/configuration.md"]
    for variable in ("EDGESCOPE_PORT", "EDGESCOPE_MAX_BATCH", "EDGESCOPE_CONFIG", "EDGESCOPE_TOKEN"):
        assert f"`{variable}`" in configuration


def test_the_readme_is_a_landing_page_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "make demo" in readme
    assert "make test" in readme
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        parts = urlsplit(link)
        if parts.scheme:
            continue
        assert (ROOT / unquote(parts.path)).exists(), f"README links to {link}, which does not exist"
