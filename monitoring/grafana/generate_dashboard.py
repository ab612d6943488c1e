#!/usr/bin/env python3
"""Writes spear-overview.json, the SPEAR Grafana dashboard.

The dashboard is generated so panels stay consistent (same label matchers,
units, layout); edit this file and run it (it also refreshes the Helm chart's copy in
deploy/k8s/helm/spear/files/), then commit them:
    python3 monitoring/grafana/generate_dashboard.py [--out PATH]
tests/deploy checks that the committed JSON equals this script's output and
that every expression parses and evaluates (see tests/deploy/README.md).
Every metric is from monitoring/metrics.md.
"""
import json
import os
import sys

# Label matchers every query carries: the dashboard is templated by
# namespace (absent on a local `spear serve`: "All" = ".*" matches the empty
# label) and model; per-worker panels also by worker.
M = 'namespace=~"$namespace", model=~"$model"'
MW = M + ', worker=~"$worker"'
RI = '$__rate_interval'

_panels = []
_y = 0
_x = 0
_row_h = 0
_next_id = 1


def _id():
    global _next_id
    _next_id += 1
    return _next_id - 1


def row(title):
    global _y, _x, _row_h
    if _x:
        _y += _row_h
    _x, _row_h = 0, 0
    _panels.append({"type": "row", "title": title, "id": _id(), "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y}, "panels": []})
    _y += 1


def _place(w, h):
    global _x, _y, _row_h
    if _x + w > 24:
        _y += _row_h
        _x, _row_h = 0, 0
    pos = {"h": h, "w": w, "x": _x, "y": _y}
    _x += w
    _row_h = max(_row_h, h)
    return pos


def panel(title, targets, unit="short", kind="timeseries", w=8, h=8, description="",
          minv=None, maxv=None, thresholds=None, stack=False):
    fc = {"unit": unit, "custom": {}}
    if kind == "timeseries":
        fc["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 30,
                        "showPoints": "never", "spanNulls": True,
                        "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    if minv is not None:
        fc["min"] = minv
    if maxv is not None:
        fc["max"] = maxv
    if thresholds:
        fc["thresholds"] = {"mode": "absolute",
                            "steps": [{"color": c, "value": v} for v, c in thresholds]}
    p = {
        "type": kind,
        "title": title,
        "id": _id(),
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": _place(w, h),
        "fieldConfig": {"defaults": fc, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
        "targets": [],
    }
    for i, (expr, legend) in enumerate(targets):
        p["targets"].append({"datasource": {"type": "prometheus", "uid": "${datasource}"},
                             "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                             "range": kind == "timeseries", "instant": kind != "timeseries"})
    _panels.append(p)


def q(quantile, metric, by="le", sel=M):
    return (f'histogram_quantile({quantile}, sum by ({by}) '
            f'(rate({metric}_bucket{{{sel}}}[{RI}])))')


def slo_attainment(by=""):
    b = f" by ({by})" if by else ""
    return (f'sum{b} (rate(spear_slo_requests_total{{{M}, met="true"}}[{RI}])) / '
            f'sum{b} (rate(spear_slo_requests_total{{{M}}}[{RI}]))')


# Router queue + worker queues in one sum (no vector matching: data even
# when one side is missing).
QUEUE = ('sum({__name__=~"spear_router_queue_depth|spear_num_requests_waiting", '
         + M + '})')


def build():
    # ---- overview ----------------------------------------------------------
    row("Overview")
    panel("SLO attainment", [(slo_attainment(), "attainment")], unit="percentunit", kind="stat",
          w=4, h=5, minv=0, maxv=1, thresholds=[(None, "red"), (0.95, "orange"), (0.99, "green")],
          description="Share of requests with a latency target that met it (TTFT and every ITL).")
    panel("TTFT p99", [(q(0.99, "spear_time_to_first_token_seconds"), "p99")], unit="s",
          kind="stat", w=4, h=5, description="Router-side time to first token, 99th percentile.")
    panel("ITL p99", [(q(0.99, "spear_inter_token_latency_seconds"), "p99")], unit="s",
          kind="stat", w=4, h=5, description="Time between streamed tokens, 99th percentile.")
    panel("Requests/s", [(f'sum(rate(spear_requests_total{{{M}}}[{RI}]))', "req/s")],
          unit="reqps", kind="stat", w=4, h=5)
    panel("EC density", [(f'avg(spear_ec_density{{{M}}})', "density")], unit="percentunit",
          kind="stat", w=4, h=5, minv=0, maxv=1,
          thresholds=[(None, "orange"), (0.9, "green")],
          description="Fraction of error-compensator FLOPs applied (1 = full quality).")
    panel("Healthy workers", [(f'sum(max by (worker) (spear_worker_up{{{M}}}))', "workers")],
          kind="stat", w=4, h=5, thresholds=[(None, "red"), (1, "green")])

    panel("Requests/s by status code",
          [(f'sum by (code) (rate(spear_requests_total{{{M}}}[{RI}]))', "{{code}}")],
          unit="reqps", w=8, stack=True)
    panel("SLO attainment by class",
          [(slo_attainment("slo_class"), "{{slo_class}}")], unit="percentunit", w=8,
          minv=0, maxv=1)
    panel("Tokens/s",
          [(f'sum(rate(spear_generation_tokens_total{{{M}}}[{RI}]))', "generated"),
           (f'sum(rate(spear_prompt_tokens_total{{{M}}}[{RI}]))', "prompt"),
           (f'sum(rate(spear_prefix_cache_hits_total{{{M}}}[{RI}]))', "prompt from prefix cache")],
          unit="short", w=8)

    # ---- latency -------------------------------------------------------------
    row("Latency")
    panel("Time to first token",
          [(q(0.5, "spear_time_to_first_token_seconds"), "p50"),
           (q(0.9, "spear_time_to_first_token_seconds"), "p90"),
           (q(0.99, "spear_time_to_first_token_seconds"), "p99")], unit="s", w=8)
    panel("Inter-token latency",
          [(q(0.5, "spear_inter_token_latency_seconds"), "p50"),
           (q(0.99, "spear_inter_token_latency_seconds"), "p99")], unit="s", w=8)
    panel("End-to-end latency",
          [(q(0.5, "spear_e2e_request_latency_seconds"), "p50"),
           (q(0.99, "spear_e2e_request_latency_seconds"), "p99")], unit="s", w=8)
    panel("Router queue time",
          [(q(0.5, "spear_queue_time_seconds"), "p50"),
           (q(0.99, "spear_queue_time_seconds"), "p99")], unit="s", w=8)
    panel("Engine iteration time",
          [(q(0.5, "spear_iteration_seconds"), "p50"),
           (q(0.99, "spear_iteration_seconds"), "p99")], unit="s", w=8)
    panel("Retries/s",
          [(f'sum by (reason) (rate(spear_retries_total{{{M}}}[{RI}]))', "{{reason}}")],
          unit="reqps", w=8)

    # ---- queue and admission -------------------------------------------------
    row("Queue and admission")
    panel("Queue", [(QUEUE, "waiting (router + workers)"),
                    (f'sum(spear_router_queue_depth{{{M}}})', "router queue"),
                    (f'sum(spear_num_requests_waiting{{{M}}})', "worker queues"),
                    (f'sum(spear_num_requests_running{{{M}}})', "running")],
          w=8, description="Requests waiting in the router's admission queue and the workers' "
                           "scheduler queues, and requests in running batches.")
    panel("Admission decisions/s",
          [(f'sum by (decision) (rate(spear_admission_decisions_total{{{M}}}[{RI}]))',
            "{{decision}}")], unit="reqps", w=8, stack=True,
          description="admit_full, admit_reduced_ec (admitted with less EC to meet the SLO), "
                      "queue, reject.")
    panel("Rejected share",
          [(f'sum(rate(spear_requests_total{{{M}, code="RESOURCE_EXHAUSTED"}}[{RI}])) / '
            f'sum(rate(spear_requests_total{{{M}}}[{RI}]))', "RESOURCE_EXHAUSTED")],
          unit="percentunit", w=8, minv=0)

    # ---- KV cache --------------------------------------------------------------
    row("KV cache")
    panel("KV cache usage", [(f'spear_kv_cache_usage_perc{{{MW}}}', "{{worker}}")],
          unit="percentunit", w=8, minv=0, maxv=1)
    panel("KV blocks used", [(f'spear_kv_cache_blocks_used{{{MW}}}', "{{worker}}")], w=8)
    panel("Preemptions/s",
          [(f'sum by (worker) (rate(spear_preemptions_total{{{MW}}}[{RI}]))', "{{worker}}")],
          unit="short", w=8)

    # ---- EC and gate -----------------------------------------------------------
    row("Error compensation (quality)")
    panel("EC density by worker", [(f'spear_ec_density{{{MW}}}', "{{worker}}"),
                                   (f'avg(spear_ec_density{{{M}}})', "mean")],
          unit="percentunit", w=8, minv=0, maxv=1)
    panel("Gate statistics",
          [(f'spear_gate_mean{{{MW}}}', "mean {{worker}}"),
           (f'spear_gate_stddev{{{MW}}}', "stddev {{worker}}")], w=8,
          description="Mean and standard deviation of g(u) = 1 + tanh(MLP(u)) over the last "
                      "iteration's tokens and EC coordinates (in (0, 2)).")
    panel("EC shed iterations/s",
          [(f'sum by (worker) (rate(spear_ec_shed_iterations_total{{{MW}}}[{RI}]))',
            "{{worker}}")], w=8,
          description="Iterations where the scheduler shed EC density to keep the ITL SLO.")
    panel("Prefill chunk", [(f'spear_prefill_chunk_tokens{{{MW}}}', "{{worker}}")], w=8,
          description="Prefill chunk the SLO-constrained scheduler chose last iteration.")
    panel("Measured / predicted iteration time",
          [(f'spear_predicted_iteration_error_ratio{{{MW}}}', "{{worker}}")], w=8,
          description="Health of the latency table: 1 = predictions exact.")
    panel("Tokens per iteration",
          [(q(0.5, "spear_iteration_tokens", "le", MW), "p50"),
           (q(0.99, "spear_iteration_tokens", "le", MW), "p99")], w=8)

    # ---- per worker --------------------------------------------------------------
    row("Per worker")
    panel("Worker TTFT p99",
          [(q(0.99, "spear_worker_time_to_first_token_seconds", "le, worker", MW), "{{worker}}")],
          unit="s", w=8)
    panel("Worker ITL p99",
          [(q(0.99, "spear_worker_inter_token_latency_seconds", "le, worker", MW), "{{worker}}")],
          unit="s", w=8)
    panel("Predicted TTFT (admission model)",
          [(f'max by (worker) (spear_worker_predicted_ttft_seconds{{{MW}}})', "{{worker}}")],
          unit="s", w=8)
    panel("Waiting / running by worker",
          [(f'spear_num_requests_waiting{{{MW}}}', "waiting {{worker}}"),
           (f'spear_num_requests_running{{{MW}}}', "running {{worker}}")], w=8)
    panel("Tokens/s by worker",
          [(f'sum by (worker) (rate(spear_decode_tokens_total{{{MW}}}[{RI}]))', "decode {{worker}}"),
           (f'sum by (worker) (rate(spear_prefill_tokens_total{{{MW}}}[{RI}]))', "prefill {{worker}}")],
          w=8)
    panel("Worker requests/s by code",
          [(f'sum by (worker, code) (rate(spear_worker_requests_total{{{MW}}}[{RI}]))',
            "{{worker}} {{code}}")], unit="reqps", w=8)
    panel("Worker health",
          [(f'max by (worker) (spear_worker_up{{{MW}}})', "up {{worker}}"),
           (f'spear_draining{{{MW}}}', "draining {{worker}}")], w=8, minv=0, maxv=1)


def var(name, label, query, multi=True):
    return {"name": name, "label": label, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "allValue": ".*", "multi": multi,
            "current": {"selected": True, "text": "All", "value": "$__all"},
            "sort": 1, "hide": 0}


def dashboard():
    build()
    return {
        "title": "SPEAR serving",
        "uid": "spear-serving",
        "description": "SPEAR router + workers: traffic, SLO, latency, queue, KV cache, "
                       "EC density and gate statistics (metrics: monitoring/metrics.md).",
        "tags": ["spear", "llm", "serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            var("namespace", "Namespace", "label_values(spear_num_requests_waiting, namespace)"),
            var("model", "Model",
                'label_values(spear_num_requests_waiting{namespace=~"$namespace"}, model)'),
            var("worker", "Worker",
                'label_values(spear_num_requests_waiting{namespace=~"$namespace", '
                'model=~"$model"}, worker)'),
        ]},
        "annotations": {"list": [
            {"name": "Alerts", "enable": True, "iconColor": "red",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "expr": 'ALERTS{alertstate="firing", alertname=~"Spear.*"}',
             "titleFormat": "{{alertname}}", "textFormat": "{{model}} {{worker}}",
             "step": "60s"}]},
        "panels": _panels,
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    outs = [os.path.join(here, "spear-overview.json"),
            # The Helm chart ships a copy (grafanaDashboard.enabled).
            os.path.join(here, "..", "..", "deploy", "k8s", "helm", "spear", "files",
                         "spear-overview.json")]
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        outs = [sys.argv[2]]
    text = json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"
    for out in outs:
        with open(out, "w") as f:
            f.write(text)
        print(os.path.normpath(out))


if __name__ == "__main__":
    main()
