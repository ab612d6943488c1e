#!/usr/bin/env python3
"""Integration: a real Prometheus scrapes a running local SPEAR cluster
under load.

1. `spear serve` (router + 2 workers on the CPU, port 0) with the real
   SmolLM2-135M-Instruct from the model cache (`spear pull smollm2-135m`).
2. scripts/monitor.sh starts Prometheus (Debian package) with the repo's
   prometheus.yml and rules, targets from the LISTENING line.
3. A Python grpcio client, generated at test time from proto/ with
   grpc_tools.protoc, sends streamed requests with latency targets.
4. Every PromQL expression of the dashboards, recording/alert rules,
   prometheus-adapter rules and KEDA triggers evaluates without error; the
   main panels (TTFT p99, SLO attainment, EC density, queue) and the
   recording rules return data; every target is up.
5. SIGTERM drains the cluster: spear serve exits 0.

Fails (never skips) when spear serve, spear-worker, prometheus, grpcio or
the model is missing, saying which."""
import argparse
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--spear", required=True, help="path of the spear binary")
ap.add_argument("--build-dir", required=True)
ap.add_argument("--model", default="", help="model path (default: SmolLM2 from the cache)")
ap.add_argument("--load-seconds", type=float, default=40)
ap.add_argument("--concurrency", type=int, default=6)
opt = ap.parse_args()

c = L.Checks("prometheus_cluster_test")


def die(msg):
    print("FAIL: " + msg, flush=True)
    print(f"prometheus_cluster_test: {c.passed} passed, {len(c.failed) + 1} failed")
    sys.exit(1)


# --- prerequisites (each missing one is a failure that says what to do) ---------
if not os.path.exists(opt.spear):
    die(f"spear serve not built: {opt.spear} does not exist (build the `spear` target)")
r = L.run([opt.spear, "serve", "--help"])
if r.returncode != 0 or "--workers" not in (r.stdout + r.stderr):
    die(f"spear serve not built: `{opt.spear} serve --help` exited {r.returncode}: "
        f"{(r.stdout + r.stderr).strip()[:300]}")
worker_bin = os.path.join(opt.build_dir, "worker", "spear-worker")
if not os.path.exists(worker_bin):
    die(f"spear-worker not built: {worker_bin} does not exist (spear serve starts it)")
L.need_tool("prometheus", "Debian package prometheus; scripts/setup.sh installs it")
L.need_module("grpc", "grpcio")
L.need_module("grpc_tools", "grpcio-tools")
model = opt.model
if not model:
    home = os.environ.get("SPEAR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
    hits = glob.glob(os.path.join(home, "models", "smollm2-135m", "*.gguf"))
    if not hits:
        die(f"SmolLM2 is not in the model cache ({home}/models/smollm2-135m): "
            "run `spear pull smollm2-135m` (scripts/test.sh does)")
    # SmolLM2 with SPEAR ECs as scripts/demo.sh caches it makes EC density
    # and gate statistics non-trivial; else the GGUF (no ECs: density 0).
    demo = os.path.join(home, "models", "smollm2-135m-w4-spear.spear")
    model = demo if os.path.exists(os.path.join(demo, "spear.json")) else hits[0]
print(f"model: {model}", flush=True)
has_ec = False
if os.path.isdir(model):
    manifest = json.load(open(os.path.join(model, "spear.json")))
    has_ec = any(m.get("ec") for m in manifest.get("modules", []))

tmp = tempfile.mkdtemp(prefix="spear-prom-test.")
procs = []


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    pidf = os.path.join(tmp, "prom", "prometheus.pid")
    if os.path.exists(pidf):
        try:
            os.kill(int(open(pidf).read()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


try:
    # --- 1. the cluster -------------------------------------------------------------
    serve_log = open(os.path.join(tmp, "serve.stderr"), "w")
    serve = subprocess.Popen(
        [opt.spear, "serve", "--model", model, "--port", "0", "--metrics-port", "0",
         "--workers", "2", "--threads", "1", "--itl-slo-ms", "500", "--worker-binary", worker_bin],
        stdout=subprocess.PIPE, stderr=serve_log, text=True)
    procs.append(serve)
    listening = None
    deadline = time.time() + 300
    while time.time() < deadline:
        line = serve.stdout.readline()
        if not line:
            break
        if line.startswith("LISTENING "):
            listening = line.strip()
            break
    if not listening:
        serve_log.flush()
        die("spear serve printed no LISTENING line: " + open(serve_log.name).read()[-2000:])
    print(listening, flush=True)
    m = re.match(r"LISTENING grpc=(\d+) metrics=(\d+) worker_metrics=([\d,]+)", listening)
    c.ok(m is not None, "LISTENING line has grpc, metrics and worker_metrics", listening)
    grpc_port = int(m.group(1))
    n_workers = len(m.group(3).split(","))
    c.ok(n_workers == 2, "two workers' metrics ports", m.group(3))

    # --- 2. Prometheus through scripts/monitor.sh ----------------------------------------
    r = L.run([os.path.join(L.ROOT, "scripts", "monitor.sh"), "--listening", listening,
               "--port", "0", "--background", "--dir", os.path.join(tmp, "prom")], timeout=120)
    pm = re.search(r"PROMETHEUS url=(\S+) pid=(\d+)", r.stdout)
    if r.returncode != 0 or not pm:
        die(f"scripts/monitor.sh failed ({r.returncode}): {r.stdout} {r.stderr}")
    url = pm.group(1)

    def query(expr, at=None):
        q = {"query": expr}
        if at:
            q["time"] = str(at)
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode(q), timeout=30) as f:
            return json.load(f)

    # --- 3. load --------------------------------------------------------------------------
    gen = os.path.join(tmp, "gen")
    os.makedirs(gen)
    r = L.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(L.ROOT, "proto"),
               f"--python_out={gen}", f"--grpc_python_out={gen}",
               os.path.join(L.ROOT, "proto", "spear", "v1", "generation.proto")])
    if r.returncode != 0:
        die("grpc_tools.protoc failed: " + r.stderr)
    sys.path.insert(0, gen)
    import grpc  # noqa: E402
    from spear.v1 import generation_pb2 as pb, generation_pb2_grpc as pbg  # noqa: E402

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pbg.GenerationStub(channel)
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "Give me three tips for staying healthy.", "Explain what a compiler does.",
               "Name a color of the sky at sunset."]
    results = {"ok": 0, "tokens": 0, "errors": {}}
    lock = threading.Lock()
    stop_at = time.time() + opt.load_seconds

    def client(i):
        k = 0
        while time.time() < stop_at:
            k += 1
            req = pb.GenerateRequest(
                prompt=prompts[(i + k) % len(prompts)], chat=True,
                sampling=pb.SamplingParams(max_tokens=12 + (k % 3) * 8, temperature=0.7, seed=i * 1000 + k),
                slo_class=pb.SLO_CLASS_INTERACTIVE if (i + k) % 2 else pb.SLO_CLASS_STANDARD)
            try:
                n = 0
                for chunk in stub.GenerateStream(req, timeout=120):
                    n += len(chunk.token_ids)
                with lock:
                    results["ok"] += 1
                    results["tokens"] += n
            except grpc.RpcError as e:
                with lock:
                    results["errors"][e.code().name] = results["errors"].get(e.code().name, 0) + 1
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(opt.concurrency)]
    for t in threads:
        t.start()
    # While the load runs: the queue gauges are scraped with requests waiting.
    time.sleep(opt.load_seconds / 2)
    mid = query(L.substitute_grafana('sum(spear_num_requests_running{namespace=~"$namespace"})'))
    for t in threads:
        t.join()
    print(f"load: {results}", flush=True)
    c.ok(results["ok"] >= 10, "load: at least 10 requests completed", str(results))
    c.ok(results["tokens"] > 0, "load: tokens streamed")
    # Let Prometheus scrape the final state and the 30 s rule groups run.
    time.sleep(40)
    now = time.time()

    # --- 4. every expression evaluates; main panels return data ------------------------------
    up = query('up{job=~"spear-router|spear-worker"}')["data"]["result"]
    c.ok(len(up) == 1 + n_workers and all(x["value"][1] == "1" for x in up),
         "router and workers scraped (up == 1)", json.dumps(up)[:400])
    c.ok(mid["status"] == "success", "query during load")

    exprs = L.all_exprs()
    c.ok(len(exprs) > 80, "expressions collected", str(len(exprs)))
    for where, expr in exprs:
        try:
            res = query(expr, now)
            c.ok(res.get("status") == "success", f"evaluates: {where}", json.dumps(res)[:300])
        except urllib.error.HTTPError as e:
            c.ok(False, f"evaluates: {where}", e.read().decode()[:300] + "\n  " + expr)

    def values_of(expr):
        res = query(expr, now)["data"]["result"]
        return [float(x["value"][1]) for x in res]

    dash = json.load(open(os.path.join(L.MONITORING, "grafana", "spear-overview.json")))
    panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
    main = {"TTFT p99": lambda v: 0 < v < 120, "SLO attainment": lambda v: 0 <= v <= 1,
            "EC density": lambda v: 0 <= v <= 1, "Queue": lambda v: v >= 0}
    for title, plausible in main.items():
        c.ok(title in panels, f"dashboard has panel '{title}'")
        if title not in panels:
            continue
        expr = L.substitute_grafana(panels[title]["targets"][0]["expr"])
        vals = values_of(expr)
        print(f"panel '{title}': {vals}", flush=True)
        c.ok(len(vals) > 0, f"panel '{title}' returns data", expr)
        c.ok(all(not math.isnan(v) and plausible(v) for v in vals),
             f"panel '{title}' value plausible", str(vals))
    if has_ec:
        dens = values_of(L.substitute_grafana(panels["EC density"]["targets"][0]["expr"]))
        c.ok(dens and dens[0] > 0, "a model with ECs serves with EC density > 0", str(dens))
    # The rest of the latency, traffic and per-worker panels too.
    for title in ("Requests/s", "ITL p99", "Time to first token", "Tokens/s", "KV cache usage",
                  "Gate statistics", "Admission decisions/s", "Worker TTFT p99",
                  "Waiting / running by worker", "Healthy workers"):
        if title in panels:
            vals = values_of(L.substitute_grafana(panels[title]["targets"][0]["expr"]))
            c.ok(len(vals) > 0, f"panel '{title}' returns data")
    healthy = values_of(L.substitute_grafana(panels["Healthy workers"]["targets"][0]["expr"]))
    c.ok(healthy == [float(n_workers)], "Healthy workers = 2", str(healthy))
    # No phantom unhealthy worker (SpearWorkerUnhealthy would page for it).
    down = query("max by (model, worker) (spear_worker_up) == 0", now)["data"]["result"]
    c.ok(down == [], "no worker the router reports unhealthy while all are up", json.dumps(down)[:300])
    # One model label for router and worker series: the per-model joins of
    # the rules and the dashboard's $model filter need it.
    rm = {x["metric"].get("model") for x in
          query('count by (model) ({job="spear-router", __name__=~"spear_.+"})', now)["data"]["result"]}
    wm = {x["metric"].get("model") for x in
          query('count by (model) ({job="spear-worker", __name__=~"spear_.+"})', now)["data"]["result"]}
    c.ok(len(rm) == 1 and rm == wm, "router and workers label the model the same",
         f"router {sorted(map(str, rm))} vs workers {sorted(map(str, wm))}")
    # Recording rules ran on real data.
    for rec in ("namespace_model:spear_time_to_first_token_seconds:p99_5m",
                "namespace_model:spear_slo_attainment:ratio_rate5m",
                "namespace_model:spear_ec_density:avg", "namespace_model:spear_queue_depth:sum",
                "namespace_model:spear_requests:rate5m"):
        c.ok(len(values_of(rec)) > 0, f"recording rule {rec} has data")
    # Per-pod autoscaling signals (adapter queries; locally grouped by instance/worker).
    for where, expr in L.adapter_exprs(matchers='job=~"spear-.*"', group_by="instance"):
        if "seriesQuery" in where or "service" in where or "slo_violation" in where:
            continue
        vals = values_of(expr)
        c.ok(len(vals) > 0, f"{where} (by instance) returns data", expr)

    # Alerts on real data: none of the availability/error alerts is even
    # pending for a healthy cluster (the SLO ones may be: a CPU is slow).
    alerts = query("ALERTS", now)["data"]["result"]
    print("alerts:", sorted({(a["metric"]["alertname"], a["metric"]["alertstate"]) for a in alerts}),
          flush=True)
    wrong = [a["metric"] for a in alerts if a["metric"]["alertname"] in (
        "SpearWorkerDown", "SpearRouterDown", "SpearWorkerUnhealthy", "SpearNoHealthyWorkers",
        "SpearServerErrors", "SpearRequestsRejected", "SpearKVCacheExhausted", "SpearEcDensityLow")]
    c.ok(not wrong, "no availability, error, KV or EC-shedding alert for a healthy cluster", json.dumps(wrong)[:400])
    rules = json.load(urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10))["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]
           if r.get("health") not in ("ok", "unknown")]
    n_rules = sum(len(g["rules"]) for g in rules)
    c.ok(n_rules >= 40 and not bad, "Prometheus loaded every rule and evaluates it without error",
         f"{n_rules} rules, bad: {bad}")

    # --- 5. SIGTERM drains and exits 0 -----------------------------------------------------
    serve.send_signal(signal.SIGTERM)
    try:
        rc = serve.wait(timeout=90)
    except subprocess.TimeoutExpired:
        rc = None
    c.ok(rc == 0, "spear serve exits 0 after SIGTERM", str(rc))
finally:
    cleanup()
c.exit()
