"""The monitoring side of deploy/, proven against a real Prometheus: one needle server on 127.0.0.1 serves
a few requests while Debian's Prometheus scrapes it with deploy/prometheus/prometheus.yml (targets and
intervals changed for the test) and evaluates deploy/prometheus/alerts.yml; then every query of the
Grafana dashboard must return data and every alert rule must evaluate cleanly."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "needle.json"
METRIC = re.compile(r"needle:[A-Za-z0-9_:]+")
# promtool's lint objects to two things vLLM's metric names do on purpose, and needle keeps vLLM's
# names so that existing dashboards port over: the `vllm:`-style colon prefix (colons are meant for
# recording rules) and `iteration_tokens_total` being a histogram. Any other finding fails the test.
# Small enough that the test's long prompt decodes sparsely; every sampled step measures recall.
SPARSE_BUDGET = 128
ACCEPTED_LINT = ("metric names should not contain ':'",
                 'non-counter metrics should not have "_total" suffix')


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_for(check, what: str, attempts: int, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check` until it returns a truthy value; a bounded number of half-second attempts."""
    for _ in range(attempts):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            result = check()
            if result:
                return result
        time.sleep(0.5)
    pytest.fail(f"gave up waiting for {what}" + (f"\n{log.read_text()[-4000:]}" if log else ""))


# ---------------------------------------------------------------- the dashboard, read statically


def dashboard_module():
    spec = importlib.util.spec_from_file_location("needle_dashboard", DASHBOARD.with_name("dashboard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out += [p] if p["type"] != "row" else p.get("panels", [])
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(json.loads(DASHBOARD.read_text())) for t in p["targets"]]


def variable_queries() -> dict[str, str]:
    """Variable name -> the PromQL selector of its label_values() definition (query variables)."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return {v["name"]: v["definition"][len("label_values("):].rsplit(", ", 1)[0] for v in variables
            if v["type"] == "query"}


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_dashboard_json_is_what_dashboard_py_writes():
    assert DASHBOARD.read_text() == dashboard_module().render(), "run: python deploy/grafana/dashboard.py"


def test_dashboard_is_templated_on_model_name():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "model_name" in variables["model_name"]["definition"]
    for title, expr in dashboard_queries():
        for ref in re.finditer(METRIC.pattern + r"(\{[^}]*\})?", expr):
            assert ref.group(1) == '{model_name="$model_name"}', f"{title}: {ref.group(0)}"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels(dashboard))


def test_promtool_accepts_the_config_and_rules():
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- one live server, one Prometheus


class Stack:
    def __init__(self, needle_url: str, prometheus_url: str, config: Path, model_name: str):
        self.needle_url, self.prometheus_url, self.config, self.model_name = (
            needle_url, prometheus_url, config, model_name)

    def query(self, expr: str) -> dict:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]

    def series(self, expr: str) -> list[dict]:
        return self.query(expr)["result"]

    def value(self, expr: str) -> float:
        result = self.series(expr)
        return float(result[0]["value"][1]) if result else math.nan


def send_requests(url: str, headers: dict, model: str) -> None:
    """Plain and streamed completions and chats, short ones (within the sparse budget: dense fallbacks)
    and one long one (beyond it: sparse decode steps with recall samples)."""
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        for i in range(3):
            r = client.post("/v1/completions", json={"model": model, "prompt": f"Count to {i + 3}:",
                                                      "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
        chat = {"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": "Say hello."}]}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            assert r.status_code == 200
            assert any(line == "data: [DONE]" for line in r.iter_lines())
        facts = " ".join(f"Item {i} weighs {i * 7 % 13} kg." for i in range(60))
        r = client.post("/v1/completions", json={"model": model, "prompt": facts + " Item 5 weighs",
                                                  "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 4 * SPARSE_BUDGET


@pytest.fixture(scope="module")
def stack(tmp_path_factory, serve):
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    flags = ["--kv-cache-memory", "256MiB", "--max-num-seqs", "4", "--attention", "sparse",
             "--sparse-token-budget", str(SPARSE_BUDGET), "--sparse-recall-sample", "1",
             "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    needle = serve(*flags)
    models = httpx.get(f"{needle.url}/v1/models", headers=needle.headers, timeout=5).json()
    model = models["data"][0]["id"]
    port = needle.url.rsplit(":", 1)[1]

    # The deploy config with the test's target, a 1s scrape and evaluation, and absolute rule paths.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    prometheus_port = free_port()
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    prom_log = tmp / "prometheus.log"
    with prom_log.open("w") as out:
        prom = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: httpx.get(f"{prometheus_url}/-/ready", timeout=5).status_code == 200,
                 "Prometheus ready", attempts=120, proc=prom, log=prom_log)
        s = Stack(needle.url, prometheus_url, config_path, model)
        # A scrape before the traffic, the traffic, then enough scrapes after it for rate() over 1m.
        wait_for(lambda: s.series('up{job="needle"} == 1'), "the first scrape", attempts=60, proc=prom,
                 log=prom_log)
        send_requests(needle.url, needle.headers, model)
        # The first scrape saw every series at zero, so an increase over 1m means rate() has 2 samples.
        done = f'needle:request_success_total{{model_name="{model}"}}'
        wait_for(lambda: s.value(f"sum({done})") >= 5 and s.value(f"sum(increase({done}[1m]))") > 0,
                 "the finished requests to be scraped", attempts=60)
        yield s
    finally:
        prom.terminate()  # Prometheus shuts down cleanly on SIGTERM
        prom.wait(timeout=60)


def substitute(expr: str, model_name: str) -> str:
    return expr.replace("$model_name", model_name).replace("$__rate_interval", "1m")


def test_every_dashboard_query_returns_data(stack):
    empty = [f"{title}: {expr}" for title, expr in dashboard_queries()
             if not stack.series(substitute(expr, stack.model_name))]
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_the_dashboard_shows_the_traffic_that_was_sent(stack):
    by_title: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        by_title.setdefault(title, []).append(substitute(expr, stack.model_name))
    value = stack.value
    assert value(by_title["Token throughput"][0]) > 0  # prompt tokens/s
    assert value(by_title["Token throughput"][1]) > 0  # generated tokens/s
    reasons = {s["metric"]["finished_reason"]: float(s["value"][1])
               for s in stack.series(by_title["Finished requests by reason"][0])}
    assert reasons["length"] > 0 and set(reasons) == {"stop", "length", "abort"}
    for title in ("Time to first token", "End-to-end request latency", "Inter-token latency", "Queue time"):
        p50 = value(by_title[title][0])
        assert math.isfinite(p50) and p50 >= 0, title
    assert 0 <= value(by_title["KV cache usage"][0]) <= 1
    assert 0 < value(by_title["Sparse attention recall"][-1]) <= 1  # mean recall of the long request
    assert value(by_title["Tokens read per step"][-1]) > 0
    assert value(by_title["Dense fallbacks"][0]) > 0  # the short requests fit in the budget
    assert value(by_title["Drafts and accepted tokens"][1]) > 0  # n-gram drafts on the repetitive prompt


def test_every_exported_metric_family_is_on_the_dashboard(stack):
    text = httpx.get(f"{stack.needle_url}/metrics", timeout=10).text
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("needle:")]
    assert len(families) >= 19
    exprs = [expr for _, expr in dashboard_queries()] + list(variable_queries().values())
    used = {m for expr in exprs for m in METRIC.findall(expr)}
    missing = [f.name for f in families if not used & ({s.name for s in f.samples} | {f.name})]
    assert not missing, f"metric families not on the dashboard: {missing}"


def test_rows_of_features_that_are_off_are_hidden(stack):
    """A feature row repeats over its variable, which lists the model only where the server reports the
    feature on: this server runs sparse attention and n-gram speculation, without value offload."""
    rows = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"}
    queries = variable_queries()
    shown = {title: bool(stack.series(substitute(queries[row["repeat"]], stack.model_name)))
             for title, row in rows.items() if "repeat" in row}
    assert shown == {"Sparse attention": True, "Speculative decoding": True, "Value offload": False}
    assert "Load" in rows and "repeat" not in rows["Load"]


def test_promtool_check_metrics_on_the_scraped_text(stack):
    text = httpx.get(f"{stack.needle_url}/metrics", timeout=10).text
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                            text=True)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in findings if not line.endswith(ACCEPTED_LINT)]
    assert not unexpected, "\n".join(unexpected)
    assert result.returncode in (0, 3)  # 3: lint findings only (all of them accepted above)


def test_promtool_accepts_the_test_config(stack):
    result = subprocess.run([tool("promtool"), "check", "config", str(stack.config)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_scrape_jobs_see_a_healthy_server(stack):
    up = {s["metric"]["job"]: s["value"][1] for s in stack.series("up")}
    assert up == {"needle": "1", "needle-health": "1"}


def test_every_alert_rule_evaluates(stack):
    expected = {rule["alert"] for rule in alert_rules()}

    def evaluated():
        groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for(evaluated, "every rule to be evaluated", attempts=30)
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    state = {r["name"]: r["state"] for r in rules}
    assert state["NeedleDown"] == state["NeedleUnhealthy"] == "inactive"
    for rule in alert_rules():
        stack.query(rule["expr"])  # valid PromQL: asserts status success
