"""Shared helpers of the tests in tests/deploy (Kubernetes manifests, Helm
chart lint, Prometheus rules, dashboards). Every check either passes or
fails with a message; a missing tool is a failure that names the tool and
how to install it (scripts/setup.sh), never a silent pass."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy", "k8s")
CHART = os.path.join(DEPLOY, "helm", "spear")
KUSTOMIZE = os.path.join(DEPLOY, "kustomize")
AUTOSCALING = os.path.join(DEPLOY, "autoscaling")
MONITORING = os.path.join(ROOT, "monitoring")
RULE_FILES = [os.path.join(MONITORING, "prometheus", f)
              for f in ("recording_rules.yml", "alert_rules.yml")]
DASHBOARDS = sorted(glob.glob(os.path.join(MONITORING, "grafana", "*.json")))


class Checks:
    """Collects failures; exit() prints the summary and sets the exit code."""

    def __init__(self, name, quiet=False):
        self.name = name
        self.quiet = quiet
        self.failed = []
        self.passed = 0

    def ok(self, cond, what, detail=""):
        if cond:
            self.passed += 1
        else:
            self.failed.append(what + (": " + detail if detail else ""))
            if not self.quiet:
                print("FAIL: " + what + (": " + detail if detail else ""), flush=True)
        return cond

    def exit(self):
        print(f"{self.name}: {self.passed} passed, {len(self.failed)} failed")
        sys.exit(1 if self.failed or self.passed == 0 else 0)


def need_tool(name, hint):
    path = shutil.which(name)
    if not path:
        print(f"FAIL: required tool '{name}' not found on PATH ({hint}); "
              "this test does not pass without it", flush=True)
        sys.exit(1)
    return path


def need_module(mod, pkg):
    try:
        return __import__(mod)
    except ImportError:
        print(f"FAIL: Python module '{mod}' missing: install the PyPI package {pkg} "
              "(scripts/setup.sh does)", flush=True)
        sys.exit(1)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def kustomize_build(path):
    """Renders a kustomization with `kubectl kustomize`; returns the docs."""
    kubectl = need_tool("kubectl", "kubectl with built-in kustomize; Debian's kubernetes-client "
                                   "package is too old (kustomize v2); install a current kubectl")
    r = run([kubectl, "kustomize", path])
    if r.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {r.stderr.strip()}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


# --- PromQL -----------------------------------------------------------------

GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "1m", "${__rate_interval}": "1m",
    "$namespace": ".*", "${namespace}": ".*", "$model": ".*", "${model}": ".*",
    "$worker": ".*", "${worker}": ".*",
}


def substitute_grafana(expr):
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def substitute_adapter(query, series, matchers, group_by):
    """Fills prometheus-adapter's metricsQuery template."""
    return (query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", group_by))


def dashboard_exprs(path):
    """(where, expr) for every panel target, template variable query and
    annotation of a dashboard, Grafana variables substituted."""
    d = json.load(open(path))
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"{os.path.basename(path)} panel '{p.get('title')}' "
                                f"{t.get('refId')}", substitute_grafana(t["expr"])))
            walk(p.get("panels", []))
    walk(d.get("panels", []))
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')}", substitute_grafana(a["expr"])))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            if not m:
                raise ValueError(f"variable {v['name']}: unsupported query {q!r}")
            out.append((f"variable {v['name']}", substitute_grafana(m.group(1))))
    return out


def rule_exprs():
    out = []
    for f in RULE_FILES:
        for g in yaml.safe_load(open(f))["groups"]:
            for r in g["rules"]:
                out.append((f"{os.path.basename(f)} {r.get('record') or r.get('alert')}",
                            r["expr"]))
    return out


def adapter_rules():
    return yaml.safe_load(open(os.path.join(AUTOSCALING, "prometheus-adapter-values.yaml")))[
        "rules"]["custom"]


def adapter_exprs(matchers='job=~".+"', group_by=None):
    """metricsQuery of every adapter rule, with the series name of its
    seriesQuery and the labels of its resource overrides as GroupBy."""
    out = []
    for r in adapter_rules():
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        labels = [k for k, v in r["resources"]["overrides"].items()
                  if v["resource"] != "namespace"]
        gb = group_by or ",".join(labels)
        out.append((f"adapter {r['name']['as']}",
                    substitute_adapter(r["metricsQuery"], series, matchers, gb)))
        out.append((f"adapter seriesQuery {r['name']['as']}", r["seriesQuery"]))
    return out


def keda_exprs():
    out = []
    for f in glob.glob(os.path.join(AUTOSCALING, "keda", "*.yaml")):
        for d in yaml.safe_load_all(open(f)):
            if d and d.get("kind") == "ScaledObject":
                for t in d["spec"]["triggers"]:
                    out.append((f"keda {d['metadata']['name']} {t.get('name')}",
                                t["metadata"]["query"]))
    return out


def all_exprs():
    exprs = rule_exprs() + adapter_exprs() + keda_exprs()
    for dash in DASHBOARDS:
        exprs += dashboard_exprs(dash)
    return exprs


def promtool_parse(exprs):
    """Parses expressions with `promtool check rules` (one recording rule
    each); returns {where: error} for those that fail."""
    promtool = need_tool("promtool", "Debian package prometheus; scripts/setup.sh installs it")
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (where, expr) in enumerate(exprs):
            path = os.path.join(tmp, f"e{i}.yml")
            with open(path, "w") as f:
                yaml.safe_dump({"groups": [{"name": "check", "rules": [
                    {"record": f"check:expr{i}", "expr": expr}]}]}, f)
            r = run([promtool, "check", "rules", path])
            if r.returncode != 0:
                errors[where] = (r.stdout + r.stderr).strip()
    return errors


def catalogue_metrics():
    """Metric names in monitoring/metrics.md's tables, with their types."""
    names = {}
    for line in open(os.path.join(MONITORING, "metrics.md")):
        m = re.match(r"\|\s*`(spear_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def metric_names_in(expr):
    return set(re.findall(r"\b(spear_[a-z0-9_]+)\b", expr))


def base_metric(name, catalogue):
    """Maps a series name (e.g. *_bucket of a histogram) to its catalogue name."""
    if name in catalogue:
        return name
    for suf in ("_bucket", "_count", "_sum"):
        if name.endswith(suf) and catalogue.get(name[: -len(suf)]) == "histogram":
            return name[: -len(suf)]
    return None
