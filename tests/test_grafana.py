"""The Grafana dashboard is provisionable from file and selects every model of every runtime.

Its structure is checked here as Grafana's dashboard model defines it;
that every metric and label it queries exists is checked against a live
scrape in test_telemetry, and that every query parses, by promtool in
test_prometheus.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from . import deploy_checks

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "gauge", "bargauge", "stat", "table"}


def _panels() -> list[dict[str, Any]]:
    return list(deploy_checks.dashboard()["panels"])


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in deploy_checks.dashboard()["templating"]["list"]}


def test_the_dashboard_needs_no_import_step() -> None:
    text = deploy_checks.DASHBOARD.read_text()
    board = json.loads(text)
    # An __inputs placeholder (${DS_...}) only resolves through the UI's import dialog, never from a file.
    assert "__inputs" not in board and "${DS_" not in text
    assert board["title"] and isinstance(board["schemaVersion"], int)
    assert board["uid"] and len(board["uid"]) <= 40 and board["uid"].replace("-", "").isalnum()
    assert "id" not in board or board["id"] is None


def test_the_datasource_is_a_variable_every_panel_uses() -> None:
    variable = _variables()["datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in _panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
    for name in ("job", "instance", "model"):
        assert _variables()[name]["datasource"] == DATASOURCE


def test_job_instance_and_model_variables_include_all_of_them() -> None:
    variables = _variables()
    for name in ("job", "instance", "model"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["multi"]
        # All as ".*", not the list Grafana found: it also matches an empty model label (a stream
        # that named no model) and models that appear after the list was loaded.
        assert variable["allValue"] == ".*"
        assert variable["definition"] == variable["query"]["query"]
    # The model list comes from every per-model counter, so a model that never succeeded is listed.
    assert deploy_checks.metric_names([variables["model"]["definition"]]) >= {
        "edgescope_inference_success_total",
        "edgescope_inference_failure_total",
        "edgescope_frames_dropped_total",
    }


def test_every_query_selects_by_job_and_instance_and_model_where_it_has_one() -> None:
    panel_exprs = [t["expr"] for p in _panels() for t in p.get("targets", [])]
    for metric, matchers in deploy_checks.selectors(panel_exprs):
        labels = {label: (operator, value) for label, operator, value in matchers}
        assert labels.get("job") == ("=~", "$job") and labels.get("instance") == ("=~", "$instance"), metric
        if "model" in labels:
            assert labels["model"][0] == "=~" and labels["model"][1] in ("$model", "$model|"), metric


def test_errors_and_drops_are_shown_for_streams_that_named_no_model() -> None:
    exprs = [t["expr"] for p in _panels() for t in p.get("targets", [])]
    for metric in ("edgescope_inference_failure_total", "edgescope_frames_dropped_total"):
        shown = [e for e in exprs if metric in e]
        assert shown and all("label_replace(" in e and '"model", "")' in e for e in shown), metric


def test_panels_lie_on_the_grid_without_overlapping() -> None:
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in itertools.product(range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]


def test_provisioning_points_at_the_compose_services_and_the_dashboard_file() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgescope.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in compose["services"]["grafana"]["volumes"]}
    dashboard_in_container = mounts["../grafana/edgescope-dashboard.json"]
    assert Path(dashboard_in_container).parent == Path(provider["options"]["path"])
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
