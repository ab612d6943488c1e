#!/usr/bin/env python3
"""Every PromQL expression SPEAR ships parses, and names only metrics of the
contract (monitoring/metrics.md): the Grafana dashboards (panels, template
variables, annotations), the recording and alert rules, the
prometheus-adapter rules and the KEDA triggers. Also checks the dashboard
is what its generator writes and has the panels operators need."""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

c = L.Checks("promql_test")
exprs = L.all_exprs()
c.ok(len(exprs) > 80, "expressions found", str(len(exprs)))

# The parse check itself must catch a broken expression.
bad = L.promtool_parse([("control", "sum(rate(spear_requests_total[5m])")])
c.ok("control" in bad, "promtool rejects an unbalanced expression (negative control)")
bad = L.promtool_parse([("control", 'histogram_quantile(0.9, sum by (le) (spear_x{a="b"}[5m]))')])
c.ok("control" in bad, "promtool rejects a range vector where an instant one is needed")

errors = L.promtool_parse(exprs)
for where, expr in exprs:
    c.ok(where not in errors, f"parses: {where}", errors.get(where, "") + "\n  " + expr)

# Metric names: every spear_* series is in the catalogue (histogram series
# through their _bucket/_count/_sum); recording-rule names (with colons)
# used anywhere are defined by the recording rules.
catalogue = L.catalogue_metrics()
c.ok(len(catalogue) >= 30, "metrics.md catalogue parsed", str(len(catalogue)))
recorded = {name for where, name in
            [(w, w.split(" ", 1)[1]) for w, _ in L.rule_exprs() if w.startswith("recording")]}
for where, expr in exprs:
    for name in re.findall(r"(?<![:\w])(spear_[a-z0-9_]+)(?![:\w])", expr):
        c.ok(L.base_metric(name, catalogue) is not None,
             f"{where}: metric {name} is in monitoring/metrics.md")
    for name in re.findall(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", expr):
        c.ok(name in recorded, f"{where}: recorded series {name} is defined")

# The committed dashboard is the generator's output.
gen = os.path.join(L.MONITORING, "grafana", "generate_dashboard.py")
dash_path = os.path.join(L.MONITORING, "grafana", "spear-overview.json")
committed = open(dash_path).read()
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "d.json")
    r = subprocess.run([sys.executable, gen, "--out", out], capture_output=True, text=True)
    c.ok(r.returncode == 0, "dashboard generator runs", r.stderr)
    regenerated = open(out).read() if os.path.exists(out) else ""
c.ok(regenerated == committed, "spear-overview.json is up to date with generate_dashboard.py")

# Dashboard content and structure.
for path in L.DASHBOARDS:
    d = json.load(open(path))
    name = os.path.basename(path)
    panels = [p for p in d["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for t in ("SLO attainment", "TTFT p99", "Time to first token", "Inter-token latency",
              "Requests/s by status code", "Queue", "KV cache usage", "EC density by worker",
              "Gate statistics", "Admission decisions/s", "Worker TTFT p99", "Worker ITL p99"):
        c.ok(t in titles, f"{name}: panel '{t}'")
    ids = [p["id"] for p in d["panels"]]
    c.ok(len(ids) == len(set(ids)), f"{name}: panel ids unique")
    for p in d["panels"]:
        g = p["gridPos"]
        c.ok(0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name}: panel '{p['title']}' fits the grid")
    vars_ = {v["name"]: v for v in d["templating"]["list"]}
    for v in ("datasource", "namespace", "model", "worker"):
        c.ok(v in vars_, f"{name}: template variable ${v}")
    for p in panels:
        c.ok(p["datasource"]["uid"] == "${datasource}", f"{name}: '{p['title']}' uses $datasource")
        for t in p["targets"]:
            e = t["expr"]
            c.ok('namespace=~"$namespace"' in e and 'model=~"$model"' in e,
                 f"{name}: '{p['title']}' {t['refId']} filters by namespace and model", e)
    # p50 and p99 of TTFT and ITL.
    texts = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("spear_time_to_first_token_seconds", "spear_inter_token_latency_seconds"):
        for qn in ("0.5", "0.99"):
            c.ok(f"histogram_quantile({qn}, sum by (le) (rate({metric}_bucket" in texts,
                 f"{name}: {metric} p{qn}")
c.exit()
