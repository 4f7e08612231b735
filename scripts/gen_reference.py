"""The reference pages of the documentation, generated from the code itself.

- ``reference/cli.md``: every command and option, from ``edgescope.cli.build_parser()``;
- ``reference/proto.md``: every service, message, field and enum, with the comments of
  the ``.proto`` files under ``proto/``;
- ``reference/configuration.md``: the keys of ``edgescope serve --config`` and the
  environment variables, from the same parser (``edgescope.config``) and the sources;
- ``reference/metrics.md``: every Prometheus metric the runtime exports, from the calls
  that define them.

MkDocs runs this file as a hook (``hooks:`` in mkdocs.yml): the pages are made at every
build and never written into ``docs/``. Run it directly to see them:
``python scripts/gen_reference.py OUT_DIR`` writes them under OUT_DIR.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
# The source folders of the installed packages (edgescope.export is export/, edgescope.runtime is runtime/).
SOURCE_DIRS = ("edgescope", "export", "runtime")
GENERATED_NOTE = "<!-- Made from the code by scripts/gen_reference.py at every build: edit the code, not this. -->\n"


def _escape(text: str) -> str:
    """Plain text for Markdown: characters Markdown would read as markup are escaped."""
    text = re.sub(r"([\\`*_\[\]|])", r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _prose(text: str) -> str:
    """Text whose `quoted` parts are code (as in the help texts and .proto comments); the rest escaped."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: all plain text
        return _escape(text)
    return "".join(_code(part) if i % 2 else _escape(part) for i, part in enumerate(parts))


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# -- commands ------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _help_of(action: argparse.Action, prog: str) -> str:
    """An option's help with its %(default)s-style fields filled in, as ``--help`` shows it."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in dict(vars(action), prog=prog).items() if v is not argparse.SUPPRESS}
    for name, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    try:
        return text % params
    except (KeyError, TypeError, ValueError):
        return text


def _value_of(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    elif action.option_strings:
        metavar = action.dest.upper()
    else:
        metavar = action.dest
    if action.nargs in ("*",):
        return f"[{metavar} ...]"
    if action.nargs in ("+",):
        return f"{metavar} [{metavar} ...]"
    if action.nargs == "?":
        return f"[{metavar}]"
    return metavar


def _default_of(action: argparse.Action) -> str | None:
    default = action.default
    if action.nargs == 0 or default is None or default is argparse.SUPPRESS or default == [] or default == "":
        return None
    if isinstance(default, (list, tuple)):
        return ", ".join(str(d) for d in default)
    return str(default)


def _option_line(action: argparse.Action, prog: str) -> str:
    names = ", ".join(action.option_strings) if action.option_strings else action.dest
    value = _value_of(action)
    head = _code(f"{names} {value}".strip())
    notes = []
    if isinstance(action, argparse._AppendAction):
        notes.append("repeatable")
    default = _default_of(action)
    if default is not None:
        notes.append(f"default: {_code(default)}")
    if action.choices is not None and action.metavar is not None:
        notes.append("one of " + ", ".join(_code(str(c)) for c in action.choices))
    suffix = f" ({'; '.join(notes)})" if notes else ""
    description = _prose(_help_of(action, prog))
    return f"- **{head}**{suffix}" + (f": {description}" if description else "")


def _command_section(name: str, parser: argparse.ArgumentParser, level: int) -> Iterator[str]:
    yield f"{'#' * level} {name}\n"
    if parser.description:
        yield _prose(parser.description) + "\n"
    yield "```text\n" + parser.format_usage().strip() + "\n```\n"
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
        ]
        if not actions:
            continue
        yield f"**{_escape(group.title or 'options')}**\n"
        if group.description:
            yield _escape(group.description) + "\n"
        yield "\n".join(_option_line(a, parser.prog) for a in actions) + "\n"
    for sub_name, sub in _subcommands(parser).items():
        yield from _command_section(f"{name} {sub_name}", sub, min(level + 1, 4))


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command under ``parser`` (nested ones included), as (full name, parser)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(prefix: str, p: argparse.ArgumentParser) -> None:
        for sub_name, sub in _subcommands(p).items():
            full = f"{prefix} {sub_name}"
            found.append((full, sub))
            walk(full, sub)

    walk(parser.prog, parser)
    return found


def cli_page(parser: argparse.ArgumentParser) -> str:
    out = [GENERATED_NOTE, "# Commands\n"]
    out.append(
        "Every command of `edgescope` and every option it takes, as `edgescope COMMAND --help` shows them. "
        "Errors are one line that says what is wrong and what to do; `edgescope --debug COMMAND` adds the "
        "full traceback.\n"
    )
    out.append("\n".join(f"- [`{name}`](#{_slug(name)})" for name, _ in commands(parser)) + "\n")
    out.append("## edgescope\n")
    out.append("```text\n" + parser.format_usage().strip() + "\n```\n")
    top = [
        a
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
    ]
    out.append("\n".join(_option_line(a, parser.prog) for a in top) + "\n")
    for name, sub in _subcommands(parser).items():
        out.extend(_command_section(f"{parser.prog} {name}", sub, 2))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading of plain words."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


# -- proto ---------------------------------------------------------------------------------------

_FIELD = re.compile(
    r"^(?:(?P<label>repeated|optional)\s+)?(?P<type>map\s*<[^>]+>|[\w.]+)\s+(?P<name>\w+)\s*=\s*(?P<number>\d+)"
)
_ENUM_VALUE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)\s*=\s*(?P<number>-?\d+)")
_RPC = re.compile(
    r"^rpc\s+(?P<name>\w+)\s*\(\s*(?P<in_stream>stream\s+)?(?P<input>[\w.]+)\s*\)\s*"
    r"returns\s*\(\s*(?P<out_stream>stream\s+)?(?P<output>[\w.]+)\s*\)"
)
_BLOCK = re.compile(r"^(?P<kind>message|enum|service|oneof)\s+(?P<name>\w+)\s*\{(?P<rest>.*)$")


@dataclass
class ProtoItem:
    """A field, an enum value or an rpc, with its comment."""

    text: str
    comment: str


@dataclass
class ProtoBlock:
    kind: str
    name: str
    comment: str
    items: list[ProtoItem] = field(default_factory=list)


@dataclass
class ProtoFile:
    path: str
    package: str
    comment: str
    blocks: list[ProtoBlock] = field(default_factory=list)


def parse_proto(path: Path, root: Path) -> ProtoFile:
    """The services, messages and enums of one .proto file with their leading and trailing comments.

    A simple line reader for the style of these files (one declaration per line), not a full
    protobuf parser: nested messages are named Outer.Inner, oneof members say which oneof.
    """
    result = ProtoFile(path=path.relative_to(root).as_posix(), package="", comment="")
    stack: list[tuple[str, str, ProtoBlock | None]] = []  # (kind, name, the block items go to)
    pending: list[str] = []
    seen_syntax = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            if not seen_syntax and pending and not result.comment:
                result.comment = " ".join(pending)
            pending = []
            continue
        if line.startswith("//"):
            pending.append(line[2:].strip())
            continue
        code, _, trailing = line.partition("//")
        code = code.strip()
        comment = " ".join([*pending, trailing.strip()]).strip()
        pending = []
        if code.startswith("syntax"):
            if not result.comment and comment:
                result.comment = comment
            seen_syntax = True
            continue
        if code.startswith("package"):
            result.package = code.removeprefix("package").strip(" ;")
            continue
        block = _BLOCK.match(code)
        if block:
            kind, name = block["kind"], block["name"]
            if kind == "oneof":
                owner = stack[-1][2] if stack else None
                stack.append(("oneof", name, owner))
            else:
                outer = [n for k, n, _ in stack if k in ("message",)]
                full = ".".join([*outer, name])
                made = ProtoBlock(kind=kind, name=full, comment=comment)
                result.blocks.append(made)
                stack.append((kind, full, made))
            if block["rest"].strip().startswith("}"):
                stack.pop()
            continue
        if code.startswith("}"):
            if stack:
                stack.pop()
            continue
        if not stack:
            continue
        kind, name, target = stack[-1]
        if target is None:
            continue
        if kind == "service":
            rpc = _RPC.match(code)
            if rpc:
                arg = ("stream " if rpc["in_stream"] else "") + rpc["input"]
                ret = ("stream " if rpc["out_stream"] else "") + rpc["output"]
                target.items.append(ProtoItem(f"{rpc['name']}({arg}) returns ({ret})", comment))
            continue
        if target.kind == "enum":
            value = _ENUM_VALUE.match(code)
            if value:
                target.items.append(ProtoItem(f"{value['name']} = {value['number']}", comment))
            continue
        found = _FIELD.match(code)
        if found and found["type"] not in ("option", "reserved", "extensions"):
            label = f"{found['label']} " if found["label"] else ""
            ftype = re.sub(r"\s+", "", found["type"]).replace(",", ", ")
            text = f"{label}{ftype} {found['name']} = {found['number']}"
            if kind == "oneof":
                text += f" (oneof {name})"
            target.items.append(ProtoItem(text, comment))
    return result


def proto_page(root: Path) -> str:
    files = [parse_proto(p, root) for p in sorted((root / "proto").rglob("*.proto"))]
    out = [GENERATED_NOTE, "# gRPC API and manifest\n"]
    out.append(
        "Every service, message, field and enum of the `.proto` files under `proto/`, with their comments. "
        "`edgescope.v1` is edgescope's own API (the bundle manifest, the stream service, telemetry); "
        "`inference` is the Open Inference Protocol (KServe v2) under its standard names.\n"
    )
    out.append("\n".join(f"- [`{f.path}`](#{_slug(f.path)})" for f in files) + "\n")
    for f in files:
        out.append(f"## {f.path}\n")
        if f.package:
            out.append(f"Package `{f.package}`.\n")
        if f.comment:
            out.append(_prose(f.comment) + "\n")
        for block in sorted(f.blocks, key=lambda b: ({"service": 0, "message": 1, "enum": 2}[b.kind], b.name)):
            out.append(f"### {block.kind} {block.name}\n")
            if block.comment:
                out.append(_prose(block.comment) + "\n")
            if block.items:
                lines = []
                for item in block.items:
                    lines.append(f"- {_code(item.text)}" + (f": {_prose(item.comment)}" if item.comment else ""))
                out.append("\n".join(lines) + "\n")
            elif block.kind == "message":
                out.append("No fields.\n")
    return "\n".join(out)


# -- configuration and environment ---------------------------------------------------------------

# Variables edgescope reads besides the EDGESCOPE_<OPTION> ones of `edgescope serve`.
OTHER_VARIABLES = {
    "EDGESCOPE_CONFIG": "the configuration file of `edgescope serve` (TOML or YAML) when `--config` is not given",
    "EDGESCOPE_TOKEN": "the bearer token a client (`edgescope stream`, `models`, `top`, `perf`) sends when "
    "`--token-file` is not given",
    "EDGESCOPE_READ_TOKEN": "one more token of the read role for `edgescope serve`, beside `--token-file`",
    "EDGESCOPE_ADMIN_TOKEN": "one more token of the admin role for `edgescope serve`, beside `--token-file`",
    "XDG_STATE_HOME": "where the default outbox of DICOM results lives (`$XDG_STATE_HOME/edgescope/outbox`, "
    "else `~/.local/state/edgescope/outbox`)",
}


def _source_files(root: Path) -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "_pb2" not in path.name:
                yield path


def environment_variables(root: Path) -> dict[str, list[str]]:
    """Every EDGESCOPE_* name (and each other known variable) the sources mention, with the files."""
    names = "|".join(re.escape(n) for n in OTHER_VARIABLES if not n.startswith("EDGESCOPE_"))
    pattern = re.compile(rf"\b(EDGESCOPE_[A-Z0-9][A-Z0-9_]*|{names})\b")
    found: dict[str, list[str]] = {}
    for path in _source_files(root):
        for name in sorted(set(pattern.findall(path.read_text(encoding="utf-8")))):
            found.setdefault(name, []).append(path.relative_to(root).as_posix())
    return found


def _kind_of(option: Any) -> str:
    if option.is_switch:
        return "switch"
    kind = option.action.type
    base = {int: "integer", float: "number"}.get(kind, "string")
    return f"list of {base}s" if option.is_list else base


def configuration_page(parser: argparse.ArgumentParser, root: Path) -> str:
    from edgescope.config import ENV_PREFIX, options_of

    serve = _subcommands(parser)["serve"]
    options = options_of(serve, skip=("config",))
    out = [GENERATED_NOTE, "# Configuration and environment\n"]
    out.append(
        "Every option of `edgescope serve` is also a key of its configuration file (`--config FILE`, TOML or "
        "YAML, or `EDGESCOPE_CONFIG`) and an environment variable. Keys are the long option names with `-` or "
        "`_`; the bundle directories are `bundles`. In the environment a switch is `1`/`0` (or true/false, "
        "yes/no, on/off) and a list is comma-separated. Flags override the environment, which overrides the "
        "file, which overrides the defaults; an unknown key, or a value of the wrong type, stops the server "
        "with an error that names it. See [Serve and stream](../serve.md#device-configuration).\n"
    )
    out.append("## Keys and variables of `edgescope serve`\n")
    out.append("| key | environment variable | flag | value | default |")
    out.append("|---|---|---|---|---|")
    for key, option in sorted(options.items()):
        default = _default_of(option.action)
        if option.is_switch:
            default = "true" if option.action.default else "false"
        flag = f"`{option.flag}`" if option.action.option_strings else "(positional)"
        out.append(
            f"| `{key.replace('_', '-')}` | `{option.env}` | {flag} | {_kind_of(option)} | "
            f"{_code(default) if default is not None else ''} |"
        )
    out.append("")
    out.append("What each option does: [`edgescope serve`](cli.md#edgescope-serve).\n")
    out.append("## Other environment variables\n")
    found = environment_variables(root)
    option_vars = {o.env for o in options.values()}
    others = sorted(n for n in found if n not in option_vars and n != ENV_PREFIX.rstrip("_"))
    out.append("| variable | meaning |")
    out.append("|---|---|")
    for name in others:
        meaning = OTHER_VARIABLES.get(name, "read by " + ", ".join(f"`{p}`" for p in found[name]))
        out.append(f"| `{name}` | {meaning} |")
    out.append("")
    return "\n".join(out)


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    labels: tuple[str, ...]
    help: str
    source: str


_KINDS = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "summary": "summary", "info": "info"}


def _strings(node: ast.AST | None) -> tuple[str, ...] | None:
    if isinstance(node, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
    return None


def _func_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def metrics(root: Path) -> list[Metric]:
    """Every metric the sources define: a call whose arguments are an ``edgescope_*`` name and its help."""
    found: dict[str, Metric] = {}
    for path in _source_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Small helpers such as gauge(name, doc, labels=("gpu",)): their default labels.
        helper_labels: dict[str, tuple[str, ...]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                args = node.args.args[len(node.args.args) - len(node.args.defaults) :]
                for arg, default in zip(args, node.args.defaults, strict=True):
                    labels = _strings(default)
                    if arg.arg == "labels" and labels is not None:
                        helper_labels[node.name] = labels
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name_node, help_node = node.args[0], node.args[1]
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            if not name_node.value.startswith("edgescope_") or not isinstance(help_node, ast.Constant):
                continue
            func = _func_name(node)
            kind = next((k for word, k in _KINDS.items() if word in func.lower()), None)
            if kind is None:
                continue
            labels = _strings(node.args[2]) if len(node.args) > 2 else None
            for keyword in node.keywords:
                if keyword.arg in ("labels", "labelnames"):
                    labels = _strings(keyword.value)
            if labels is None:
                labels = helper_labels.get(func, ())
            name = name_node.value
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            found[name] = Metric(name, kind, labels, str(help_node.value), path.relative_to(root).as_posix())
    return sorted(found.values(), key=lambda m: m.name)


def metrics_page(root: Path) -> str:
    out = [GENERATED_NOTE, "# Metrics\n"]
    out.append(
        "Every Prometheus metric the server exports on `/metrics` (`--metrics-port`, default 8732), with "
        "its type, labels and help text. Series are labelled per model, never per stream. What they mean "
        "in practice, and the dashboard over them: [Telemetry and dashboard](../telemetry.md).\n"
    )
    out.append("| metric | type | labels | help |")
    out.append("|---|---|---|---|")
    for m in metrics(root):
        labels = ", ".join(m.labels)
        out.append(f"| `{m.name}` | {m.kind} | {labels} | {_prose(m.help)} |")
    out.append("")
    return "\n".join(out)


# -- the pages -----------------------------------------------------------------------------------


def pages(root: Path = ROOT) -> dict[str, str]:
    """The generated pages by their path under docs/."""
    from edgescope.cli import build_parser

    parser = build_parser()
    return {
        "reference/cli.md": cli_page(parser),
        "reference/proto.md": proto_page(root),
        "reference/configuration.md": configuration_page(parser, root),
        "reference/metrics.md": metrics_page(root),
    }


def source_tree(root: Path = ROOT, target: Path | None = None) -> Path:
    """A tree of links laid out as the installed package (edgescope/export is export/, ...).

    mkdocstrings reads the sources statically, by import path; in the repository
    ``edgescope.export`` lives in ``export/``, so it reads them from this tree
    (``paths: [build/docs-src]`` in mkdocs.yml). Made afresh at every build.
    """
    target = target or root / "build" / "docs-src"
    package = target / "edgescope"
    if target.exists():
        shutil.rmtree(target)
    package.mkdir(parents=True)
    for entry in sorted((root / "edgescope").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "export").symlink_to(root / "export", target_is_directory=True)
    (package / "runtime").symlink_to(root / "runtime", target_is_directory=True)
    return target


@event_priority(100)  # before mkdocstrings reads its paths
def on_config(config: Any) -> Any:
    """MkDocs hook: lay out the sources for mkdocstrings before any page is read."""
    source_tree()
    return config


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated pages to the site."""
    from mkdocs.structure.files import File

    for path, content in pages().items():
        files.append(File.generated(config, path, content=content))
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/gen_reference.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for path, content in pages().items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
