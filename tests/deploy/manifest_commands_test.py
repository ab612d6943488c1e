#!/usr/bin/env python3
"""The commands the manifests run, run for real: the router and worker
containers of Kustomize overlays/cpu (= the chart with values-cpu.yaml)
started from their rendered command, args and env, as the kubelet would
expand them, on loopback. Only what a pod has and a test machine does not
is substituted: the volume path /models (a temp dir whose served/<name>
is SmolLM2 from the cache), listen address 127.0.0.1 instead of 0.0.0.0,
ports 0 instead of fixed ones, the cluster DNS name of the headless Service
(-> 127.0.0.1:<worker port>), and 1 compute thread. Then: every flag of
every profile (GPU, CPU, TLS + auth) is one the binaries accept; both
servers answer grpc.health.v1 like the probes; the router lists the model
under model.name with a healthy worker and answers; router and worker
metrics carry model = model.name and worker = the pod name (what the
autoscaler maps to pods); SIGTERM drains both, exit 0."""
import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--router", required=True, help="spear-router binary")
ap.add_argument("--worker", required=True, help="spear-worker binary")
ap.add_argument("--spear", required=True, help="spear binary (model-prep runs spear pull/quantize)")
opt = ap.parse_args()
c = L.Checks("manifest_commands_test")
for b in (opt.router, opt.worker, opt.spear):
    if not os.path.exists(b):
        print(f"FAIL: {b} not built (build targets spear-router and spear-worker)")
        sys.exit(1)
L.need_module("grpc", "grpcio")
L.need_module("grpc_tools", "grpcio-tools")
L.need_module("helm_python", "helm-python-sdk")
import helm_python as helm  # noqa: E402
import yaml  # noqa: E402


def usage_flags(binary):
    r = L.run([binary, "--help"])
    return set(re.findall(r"^\s*(--[a-z0-9-]+)", r.stdout + r.stderr, re.M))


BIN = {"spear-router": opt.router, "spear-worker": opt.worker}
flags = {k: usage_flags(v) for k, v in BIN.items()}
c.ok(len(flags["spear-router"]) > 10 and len(flags["spear-worker"]) > 10, "binaries list their flags",
     str({k: len(v) for k, v in flags.items()}))


def containers(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for x in d["spec"]["template"]["spec"]["containers"]:
                yield d, x


# Every flag in every profile is accepted by the binary the container runs.
profiles = {"kustomize overlays/gpu": L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "gpu")),
            "kustomize overlays/cpu": L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "cpu"))}
with helm.Chart.load(L.CHART) as ch:
    out = ch.render({"router": {"tls": {"enabled": True, "mutual": True}, "auth": {"enabled": True}},
                     "worker": {"extraArgs": []}}, name="spear", namespace="spear")
profiles["helm tls+auth"] = [d for k, t in out.items() if k.endswith(".yaml")
                             for d in yaml.safe_load_all(t) if d]
for label, docs in profiles.items():
    for d, x in containers(docs):
        binary = x["command"][0]
        c.ok(binary in BIN, f"{label}: {d['metadata']['name']} runs a SPEAR server", binary)
        for a in x.get("args", []):
            f = a.split("=", 1)[0]
            c.ok(f in flags.get(binary, set()), f"{label}: {binary} accepts {f}")

# model-prep's `spear quantize` flags: spear checks every flag before it
# loads anything (exit 2 for a bad flag), so a missing model must give exit 1.
for label, docs in profiles.items():
    for d in docs:
        if d["kind"] == "ConfigMap" and "SPEAR_QUANTIZE_ARGS" in d.get("data", {}):
            qargs = d["data"]["SPEAR_QUANTIZE_ARGS"].split()
            with tempfile.TemporaryDirectory() as t:
                cmd = [opt.spear, "quantize", "--model", os.path.join(t, "absent"),
                       "--out", os.path.join(t, "out"), "--force"]
                r = L.run(cmd + qargs)
                c.ok(r.returncode == 1 and "no such model" in r.stderr,
                     f"{label}: spear quantize accepts {' '.join(qargs)}", f"rc={r.returncode} {r.stderr[:300]}")
                r = L.run(cmd + qargs + ["--method", "bogus"])
                c.ok(r.returncode == 2, "negative control: a bad quantize flag exits 2")
prep = open(os.path.join(L.CHART, "templates", "configmap-model.yaml")).read()
for sub in ("pull", "quantize"):
    r = L.run([opt.spear, sub, "--help"])
    c.ok("unknown command" not in (r.stdout + r.stderr) and f"spear {sub}" in prep,
         f"init scripts use `spear {sub}`, which exists")

# --- run overlays/cpu's containers ---------------------------------------------------
docs = profiles["kustomize overlays/cpu"]
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spear-model")["data"]
home = os.environ.get("SPEAR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "spear")
gguf = glob.glob(os.path.join(home, "models", "smollm2-135m", "*.gguf"))
if not gguf:
    print(f"FAIL: SmolLM2 is not in the model cache ({home}): run `spear pull smollm2-135m`")
    sys.exit(1)
c.ok(cm["SPEAR_MODEL_SOURCE"] == "smollm2-135m", "the CPU profile serves SmolLM2 (what CI has)")
tmp = tempfile.mkdtemp(prefix="spear-manifest-test.")
models = os.path.join(tmp, "models")
os.makedirs(os.path.join(models, "served"))
# What model-prep leaves in the volume (the test serves the source as is).
os.symlink(gguf[0], os.path.join(models, "served", cm["SPEAR_MODEL_NAME"]))


def pod_env(x, pod_name):
    env = {"POD_NAME": pod_name, "POD_NAMESPACE": "spear"}
    for ef in x.get("envFrom", []):
        if ef.get("configMapRef", {}).get("name") == "spear-model":
            env.update(cm)
    for e in x.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = cm[e["valueFrom"]["configMapKeyRef"]["key"]]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[e["name"]] = "spear"
    env["SPEAR_HOME"] = home  # the volume's cache -> this machine's cache
    return env


def expand(s, env):  # the kubelet's $(VAR) expansion
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def local_args(args, env, extra=None):
    out = []
    for a in args:
        a = expand(a, env).replace("/models/", models + "/")
        f, _, v = a.partition("=")
        if f in ("--port", "--metrics-port"):
            a = f + "=0"
        elif f == "--host":
            a = "--host=127.0.0.1"
        elif f == "--threads":
            a = "--threads=1"
        elif extra and f in extra:
            a = f + "=" + extra[f]
        out.append(a)
    return out


def start(binary, args, env, name):
    e = dict(os.environ)
    e.update(env)
    log = open(os.path.join(tmp, name + ".log"), "w")
    p = subprocess.Popen([BIN[binary]] + args, env=e, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        m = re.match(r"LISTENING grpc=(\d+) metrics=(\d+)", line)
        if m:
            return p, int(m.group(1)), int(m.group(2))
    p.kill()
    log.close()
    print(f"FAIL: {binary} did not start: " + open(log.name).read()[-1500:])
    sys.exit(1)


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as f:
        return f.read().decode()


procs = []
try:
    wdoc = next(d for d in docs if d["kind"] == "StatefulSet")
    wx = wdoc["spec"]["template"]["spec"]["containers"][0]
    wenv = pod_env(wx, "spear-worker-0")
    wargs = local_args(wx["args"], wenv)
    print("worker:", " ".join(wargs), flush=True)
    worker, wport, wmport = start(wx["command"][0], wargs, wenv, "worker")
    procs.append(worker)

    rdoc = next(d for d in docs if d["kind"] == "Deployment")
    rx = rdoc["spec"]["template"]["spec"]["containers"][0]
    renv = pod_env(rx, "spear-router-abc12")
    dns = expand(next(a for a in rx["args"] if a.startswith("--workers-dns=")), renv)
    c.ok(dns == f"--workers-dns=spear-worker.spear.svc.cluster.local:{wx['ports'][0]['containerPort']}",
         "router resolves the worker Service in its own namespace", dns)
    rargs = local_args(rx["args"], renv, {"--workers-dns": f"127.0.0.1:{wport}"})
    print("router:", " ".join(rargs), flush=True)
    router, rport, rmport = start(rx["command"][0], rargs, renv, "router")
    procs.append(router)

    # Stubs: the public API and grpc.health.v1 (as spear_health: a top-level
    # `grpc` package would shadow grpcio).
    gen = os.path.join(tmp, "gen")
    os.makedirs(os.path.join(gen, "spear_health"))
    health_src = open(os.path.join(L.ROOT, "router", "proto", "grpc", "health", "v1", "health.proto")).read()
    open(os.path.join(gen, "spear_health", "health.proto"), "w").write(health_src)
    for inc, f in ((os.path.join(L.ROOT, "proto"), os.path.join(L.ROOT, "proto", "spear", "v1", "generation.proto")),
                   (gen, os.path.join(gen, "spear_health", "health.proto"))):
        r = L.run([sys.executable, "-m", "grpc_tools.protoc", "-I", inc, f"--python_out={gen}",
                   f"--grpc_python_out={gen}", f])
        if r.returncode != 0:
            print("FAIL: protoc: " + r.stderr)
            sys.exit(1)
    sys.path.insert(0, gen)
    import grpc  # noqa: E402
    from spear.v1 import generation_pb2 as pb, generation_pb2_grpc as pbg  # noqa: E402
    from spear_health import health_pb2 as hpb, health_pb2_grpc as hpbg  # noqa: E402

    # The probes: grpc.health.v1 Check with the empty service name.
    for name, port in (("worker", wport), ("router", rport)):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        resp = hpbg.HealthStub(ch).Check(hpb.HealthCheckRequest(service=""), timeout=10)
        c.ok(resp.status == hpb.HealthCheckResponse.SERVING, f"{name}: grpc health SERVING (the probe)")

    stub = pbg.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{rport}"))
    info = None
    for _ in range(60):
        info = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        if info.models and info.models[0].healthy_workers >= 1:
            break
        time.sleep(0.5)
    names = [m.name for m in info.models]
    c.ok(names == [cm["SPEAR_MODEL_NAME"]], "router lists the model under model.name", str(names))
    c.ok(info.models and info.models[0].healthy_workers == 1, "router found the worker through --workers-dns")
    r = stub.Generate(pb.GenerateRequest(prompt="The capital of France is",
                                         sampling=pb.SamplingParams(max_tokens=8)), timeout=120)
    c.ok(r.usage.completion_tokens > 0 and r.worker != "", "router answers through the worker",
         f"{r.usage} worker={r.worker!r}")

    wm, rm = scrape(wmport), scrape(rmport)
    wmodels = set(re.findall(r'^spear_\w+\{[^}]*model="([^"]*)"', wm, re.M))
    rmodels = set(re.findall(r'^spear_\w+\{[^}]*model="([^"]*)"', rm, re.M))
    c.ok(wmodels == {cm["SPEAR_MODEL_NAME"]}, "worker metrics: model = model.name", str(wmodels))
    c.ok(rmodels == {cm["SPEAR_MODEL_NAME"]}, "router metrics: model = model.name", str(rmodels))
    wids = set(re.findall(r'^spear_\w+\{[^}]*worker="([^"]*)"', wm, re.M))
    c.ok(wids == {"spear-worker-0"}, "worker metrics: worker = the pod name", str(wids))
    up = re.findall(r'^spear_worker_up\{([^}]*)\} (\S+)', rm, re.M)
    c.ok(any('worker="spear-worker-0"' in lbl and v == "1" for lbl, v in up),
         "router: spear_worker_up{worker=<pod name>} 1 (the adapter maps it to the pod)", str(up))

    # SIGTERM (what the kubelet sends after preStop): drain, exit 0.
    for name, p in (("router", router), ("worker", worker)):
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        c.ok(rc == 0, f"{name}: SIGTERM drains and exits 0", str(rc))
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
c.exit()
