"""Draws needle.json with live data from a real Prometheus into one PNG, where no Grafana can run:

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --model-name NAME --out PNG

Each panel's queries go through Prometheus' own query_range API (the dashboard's `$model_name`,
`$__rate_interval` and `$__interval` substituted as Grafana would); time series are drawn as lines,
heatmaps as bucket-rate images, in the dashboard's grid and row order, with its titles and units. Rows
hidden on a dashboard because their feature is off (a `repeat` variable with no values) are left out.
Needs matplotlib (`pip install -e ".[plots]"`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).with_name("needle.json")
UNITS = {"percentunit": "fraction", "s": "seconds", "reqps": "requests/s", "short": "", "none": ""}


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query_range",
                  params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]


def label(legend: str, metric: dict) -> str:
    out = legend
    for key, value in metric.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def variable_values(prom: str, dashboard: dict, name: str, model: str) -> list[str]:
    """Values of a dashboard variable (label_values(metric, label)), as Grafana would offer them."""
    for var in dashboard["templating"]["list"]:
        if var["name"] == name:
            definition = var["definition"].replace("$model_name", model)
            metric, lab = definition[len("label_values("):-1].split(", ")
            r = httpx.get(f"{prom}/api/v1/series", params={"match[]": metric}, timeout=30).json()["data"]
            return sorted({s[lab] for s in r if s.get("model_name", model) == model and lab in s})
    return []


def visible_panels(prom: str, dashboard: dict, model: str) -> list[tuple[dict, list[dict]]]:
    """(row, its panels) in order, without the rows whose repeat variable has no values."""
    rows: list[tuple[dict, list[dict]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            rows.append((panel, list(panel.get("panels", []))))
        elif rows:
            rows[-1][1].append(panel)
    return [(row, panels) for row, panels in rows
            if not row.get("repeat") or variable_values(prom, dashboard, row["repeat"], model)]


def render(prom: str, model: str, out: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time()
    start = end - 60 * minutes
    step = max(2.0, 60 * minutes / 200)
    rows = visible_panels(prom, dashboard, model)
    cells = [(row["title"], p) for row, panels in rows for p in panels]
    cols = 3
    fig, axes = plt.subplots(-(-len(cells) // cols), cols, figsize=(18, 3.1 * -(-len(cells) // cols)),
                             squeeze=False)
    for ax, (row_title, panel) in zip(axes.flat, cells, strict=False):
        for target in panel["targets"]:
            expr = (target["expr"].replace("$model_name", model).replace("$__rate_interval", "1m")
                    .replace("$__interval", f"{int(step)}s"))
            series = query_range(prom, expr, start, end, step)
            if panel["type"] == "heatmap":
                series = [s for s in series if s["metric"].get("le") not in (None, "+Inf")]
                series.sort(key=lambda s: float(s["metric"]["le"]))
                if series:
                    grid = [[float(v) for _, v in s["values"]] for s in series]
                    width = min(len(g) for g in grid)
                    ax.imshow([g[:width] for g in grid], aspect="auto", origin="lower", cmap="viridis")
                    ax.set_yticks(range(len(series)), [s["metric"]["le"] for s in series], fontsize=6)
                continue
            for s in series:
                ts = [(float(t) - end) / 60 for t, _ in s["values"]]
                ax.plot(ts, [float(v) for _, v in s["values"]], lw=1.2,
                        label=label(target.get("legendFormat", ""), s["metric"]))
        ax.set_title(f"{row_title} / {panel['title']}", fontsize=9)
        ax.set_ylabel(UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""), ""),
                      fontsize=7)
        ax.tick_params(labelsize=7)
        if panel["type"] != "heatmap" and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
        if panel["type"] != "heatmap":
            ax.set_xlabel("minutes", fontsize=7)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} (model_name={model}), rendered from Prometheus {prom} on "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--model-name", required=True, help="the model_name label to show")
    ap.add_argument("--minutes", type=float, default=10, help="time range ending now")
    ap.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")), help="PNG to write")
    args = ap.parse_args()
    render(args.prometheus, args.model_name, Path(args.out), args.minutes)


if __name__ == "__main__":
    main()
