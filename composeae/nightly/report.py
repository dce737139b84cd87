"""The nightly report: tonight's champion/challenger comparison and the champion's recent nights.

Written into the model registry as `reports/<date>.json` (the figures) and `reports/<date>.html`
(one self-contained page, pictures inlined), and copied to `reports/latest.html`. The line of
the model in service over the last nights comes from the earlier nights' JSON reports.
"""

from __future__ import annotations

import html
import json
from typing import Any

from composeae import storage
from composeae.registry.store import ModelRegistry
from composeae.report.figures import bars_png, img, line_chart_png, page_style
from composeae.report.tables import recall_keys


def night_record(night: str, version: dict[str, Any], status: str) -> dict[str, Any]:
    """The JSON report of one night."""
    decision = version["decision"]
    challenger = version["evaluation"]["table"]
    champion = decision["champion_table"]
    in_service = version["version"] if decision["promote"] else decision["champion"]
    serving_table = challenger if decision["promote"] else champion
    return {
        "date": night,
        "status": status,
        "reason": decision["reason"],
        "alias": decision["alias"],
        "metric": decision["metric"],
        "margin": decision["margin"],
        "challenger": {"version": version["version"], "table": challenger},
        "champion": ({"version": decision["champion"], "table": champion}
                     if champion is not None else None),
        "in_service": {"version": in_service,
                       "value": serving_table[decision["metric"]] if serving_table else None},
        "data_fingerprint": version["data"]["fingerprint"],
        "run_url": version["run_url"],
        "code_version": version["code_version"],
    }


def _recent(registry: ModelRegistry, night: str, nights: int) -> list[dict[str, Any]]:
    """The JSON reports of the last `nights` nights up to `night`, oldest first."""
    names = sorted(n for n in storage.listdir(registry.report_url())
                   if n.endswith(".json") and n[:-5] <= night)
    return [json.loads(storage.read_text(registry.report_url(n))) for n in names[-nights:]]


def render_night(record: dict[str, Any], recent: list[dict[str, Any]]) -> str:
    metric = record["metric"]
    tables = {}
    if record["champion"]:
        tables[f"champion v{record['champion']['version']}"] = record["champion"]["table"]
    tables[f"challenger v{record['challenger']['version']}"] = record["challenger"]["table"]
    keys = recall_keys(record["challenger"]["table"])
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{100 * table[k]:.2f}</td>" for k in keys) + "</tr>"
        for name, table in tables.items())
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    served = [r for r in recent if r["in_service"]["value"] is not None]
    line = {f"{record['alias']} in service": ([r["date"] for r in served],
                                              [100 * r["in_service"]["value"] for r in served])}
    pictures = [
        ("champion and challenger",
         bars_png(tables, keys, f"night {record['date']}: champion and challenger")),
        (f"last {len(served)} nights", line_chart_png(
            line, f"{metric} of the {record['alias']} after each night", "recall (%)",
            xlabel="night")),
    ]
    images = "".join(img(png, html.escape(alt)) for alt, png in pictures)
    colour = {"promoted": "#1a7f37", "kept": "#9a6700"}.get(record["status"], "#444")
    style = page_style(f".status{{color:{colour};font-weight:bold}}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae nightly {html.escape(record["date"])}</title>
{style}</head>
<body>
<h1>Nightly {html.escape(record["date"])}:
<span class="status">{html.escape(record["status"])}</span></h1>
<p>{html.escape(record["reason"])}</p>
<p>{html.escape(record["alias"])} after tonight: version {record["in_service"]["version"]}.
Data fingerprint <code>{html.escape(record["data_fingerprint"][:12])}</code>, code
<code>{html.escape(record["code_version"])}</code>, run <code>{html.escape(record["run_url"])}</code>.</p>
<h2>Recall (%)</h2>
<table><tr><th>model</th>{head}</tr>{rows}</table>
<h2>Pictures</h2>
{images}
</body></html>
"""


def write_night_report(registry: ModelRegistry, night: str, version: dict[str, Any],
                       status: str, nights: int) -> str:
    """Write the night's JSON and HTML reports (and `latest.html`); returns the HTML URL."""
    record = night_record(night, version, status)
    storage.write_text(registry.report_url(f"{night}.json"), json.dumps(record, indent=2) + "\n")
    page = render_night(record, _recent(registry, night, nights))
    url = registry.report_url(f"{night}.html")
    storage.write_text(url, page)
    latest = [n for n in storage.listdir(registry.report_url()) if n.endswith(".json")]
    if max(latest) == f"{night}.json":  # a re-run old night does not replace a newer latest
        storage.write_text(registry.report_url("latest.html"), page)
    return url
