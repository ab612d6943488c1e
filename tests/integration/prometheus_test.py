#!/usr/bin/env python3
"""A real Prometheus (Debian package `prometheus`) scrapes spear-router and
two spear-workers; the PromQL of monitoring/metrics.md for TTFT p99, SLO
attainment and EC density returns data. Skips (77) without the model;
fails when prometheus is not installed (scripts/setup.sh installs it)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster  # noqa: E402

MODEL = cluster.smollm2_path()
if MODEL is None:
    print("SKIP: SmolLM2 not in the model cache")
    sys.exit(77)
PROM = shutil.which("prometheus")
if PROM is None:
    print("FAIL: prometheus not installed (scripts/setup.sh installs the Debian package)")
    sys.exit(1)
cluster.gen_stubs()
import grpc  # noqa: E402
from spear.v1 import generation_pb2 as pb  # noqa: E402
from spear.v1 import generation_pb2_grpc as pbg  # noqa: E402

QUERIES = {
    "ttft_p99": 'histogram_quantile(0.99, sum by (le, model) (rate(spear_time_to_first_token_seconds_bucket[5m])))',
    "slo_attainment": 'sum by (model) (rate(spear_slo_requests_total{met="true"}[5m])) / sum by (model) (rate(spear_slo_requests_total[5m]))',
    "ec_density": 'avg by (model) (spear_ec_density)',
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def query(url, expr):
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.load(r)


def main():
    tmp = tempfile.mkdtemp()
    workers = [cluster.start_worker(MODEL, f"prom-worker-{i}") for i in range(2)]
    router = cluster.start_router(MODEL, workers)
    prom = None
    fails = 0
    try:
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                    f"  - job_name: spear-router\n    static_configs:\n      - targets: ['127.0.0.1:{router.metrics_port}']\n"
                    "  - job_name: spear-worker\n    static_configs:\n      - targets: [" +
                    ", ".join(f"'127.0.0.1:{w.metrics_port}'" for w in workers) + "]\n")
        port = free_port()
        prom = subprocess.Popen([PROM, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "prom.log"), "w"))
        url = f"http://127.0.0.1:{port}"
        ch = grpc.insecure_channel(router.address)
        cluster.wait_healthy(pbg, ch, 2)
        stub = pbg.GenerationStub(ch)
        def traffic(i):
            r = pb.GenerateRequest(prompt=f"Say something nice, {i}.", slo_class=pb.SLO_CLASS_STANDARD)
            r.sampling.max_tokens = 8
            stub.Generate(r, timeout=120)

        # rate() needs samples before and after the traffic: wait until every
        # target has been scraped, then spread requests over several scrapes.
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                up = query(url, "up")["data"]["result"]
                if len(up) == 3 and all(x["value"][1] == "1" for x in up):
                    break
            except Exception:  # noqa: BLE001 - Prometheus still starting
                pass
            time.sleep(0.5)
        for i in range(8):
            traffic(i)
            time.sleep(0.5)
        deadline = time.time() + 60
        results = {}
        i = 8
        while time.time() < deadline:
            traffic(i)
            i += 1
            results = {}
            for name, expr in QUERIES.items():
                try:
                    res = query(url, expr)
                    results[name] = res["data"]["result"] if res.get("status") == "success" else []
                except Exception:  # noqa: BLE001 - Prometheus still starting
                    results[name] = []
            # Ready when every query has a sample that is a number (rate()
            # needs two scrapes after the traffic).
            if all(r and all(x["value"][1] not in ("NaN", "+Inf", "-Inf") for x in r) for r in results.values()):
                break
            time.sleep(1)
        up = query(url, "up")["data"]["result"]
        print("targets up:", [(x["metric"]["job"], x["metric"]["instance"], x["value"][1]) for x in up])
        if len(up) != 3 or any(x["value"][1] != "1" for x in up):
            print("FAIL: not every target is up")
            fails += 1
        for name, res in results.items():
            vals = [x["value"][1] for x in res]
            print(f"{name}: {QUERIES[name]}\n   -> {vals}")
            if not res or any(v in ("NaN",) for v in vals):
                print(f"FAIL: {name} returned no data")
                fails += 1
        ch.close()
    finally:
        if prom:
            prom.terminate()
            prom.wait(30)
        router.stop()
        for w in workers:
            w.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("OK" if fails == 0 else f"{fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
