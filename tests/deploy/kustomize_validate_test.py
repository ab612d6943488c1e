#!/usr/bin/env python3
"""Renders every Kustomize tree of deploy/k8s with `kubectl kustomize` and
validates each manifest with kubernetes-validate (strict: unknown fields
fail) against the oldest and the newest Kubernetes the chart supports; CRDs
(KEDA ScaledObject) against schemas in tests/deploy/schemas. Then checks
that the objects fit together: Service selectors and target ports, probes,
the router's worker DNS name, grace periods, GPU requests, HPA targets and
the adapter metrics they read."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

kv = L.need_module("kubernetes_validate", "kubernetes-validate")
jsonschema = L.need_module("jsonschema", "jsonschema (a dependency of kubernetes-validate)")
from kubernetes_validate import utils as kvu  # noqa: E402

c = L.Checks("kustomize_validate_test")
VERSIONS = ["1.27.0", kvu.latest_version()]
SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
        ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json"}
MAX_REQUEST_SECONDS = 600  # values.yaml drain.maxRequestSeconds


def validate(doc, where):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS:
        schema = json.load(open(os.path.join(SCHEMAS, CRDS[key])))
        try:
            jsonschema.validate(doc, schema)
            return True
        except jsonschema.ValidationError as e:
            return c.ok(False, f"{where}: {key[1]} schema", e.message)
    good = True
    for v in VERSIONS:
        try:
            kv.validate(doc, v, strict=True)
        except kvu.ValidationError as e:
            good = c.ok(False, f"{where}: valid for Kubernetes {v}",
                        ".".join(str(p) for p in e.path) + ": " + e.message)
        except kvu.SchemaNotFoundError as e:
            good = c.ok(False, f"{where}: schema exists for Kubernetes {v}", e.message)
    return good


# Negative controls: the validator must reject what is wrong.
bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
       "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}},
                             "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
try:
    kv.validate(bad, VERSIONS[-1], strict=True)
    c.ok(False, "kubernetes-validate rejects replicas: 'two' (negative control)")
except kvu.ValidationError:
    c.ok(True, "negative control: wrong type")
bad["spec"]["replicas"] = 1
bad["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 1}
try:
    kv.validate(bad, VERSIONS[-1], strict=True)
    c.ok(False, "kubernetes-validate (strict) rejects an unknown field (negative control)")
except kvu.ValidationError:
    c.ok(True, "negative control: unknown field")

TREES = {
    "base": os.path.join(L.KUSTOMIZE, "base"),
    "overlays/cpu": os.path.join(L.KUSTOMIZE, "overlays", "cpu"),
    "overlays/gpu": os.path.join(L.KUSTOMIZE, "overlays", "gpu"),
    "autoscaling/hpa": os.path.join(L.AUTOSCALING, "hpa"),
    "autoscaling/keda": os.path.join(L.AUTOSCALING, "keda"),
    "monitoring": os.path.join(L.KUSTOMIZE, "monitoring"),
}
rendered = {}
for name, path in TREES.items():
    try:
        docs = L.kustomize_build(path)
    except RuntimeError as e:
        c.ok(False, f"render {name}", str(e))
        continue
    c.ok(len(docs) > 0, f"{name} renders objects")
    rendered[name] = docs
    for d in docs:
        c.ok(validate(d, f"{name} {d['kind']}/{d['metadata']['name']}"),
             f"{name} {d['kind']}/{d['metadata']['name']} validates")


def find(docs, kind, name=None):
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return out


def pod_spec(w):
    return w["spec"]["template"]["spec"]


def container(w, name):
    return next(x for x in pod_spec(w)["containers"] if x["name"] == name)


def arg(cont, flag):
    for a in cont.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_cluster(name, docs):
    workloads = find(docs, "Deployment") + find(docs, "StatefulSet")
    c.ok(len(find(docs, "Deployment", "spear-router")) == 1, f"{name}: router Deployment")
    c.ok(len(find(docs, "StatefulSet", "spear-worker")) == 1, f"{name}: worker StatefulSet")
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in ("spear-router", "spear-worker"):
            c.ok(len(find(docs, kind, obj)) == 1, f"{name}: {kind} {obj}")
    router = find(docs, "Deployment", "spear-router")[0]
    worker = find(docs, "StatefulSet", "spear-worker")[0]
    # Services select exactly their workload's pods; target ports exist.
    for svc in find(docs, "Service"):
        sel = svc["spec"]["selector"]
        hits = [w for w in workloads
                if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        c.ok(len(hits) == 1, f"{name}: Service {svc['metadata']['name']} selects one workload",
             str([h["metadata"]["name"] for h in hits]))
        if hits:
            ports = {p["name"]: p["containerPort"] for x in pod_spec(hits[0])["containers"]
                     for p in x.get("ports", [])}
            for p in svc["spec"]["ports"]:
                c.ok(p["targetPort"] in ports and ports[p["targetPort"]] == p["port"],
                     f"{name}: Service {svc['metadata']['name']} port {p['name']} -> container port",
                     f"{p} vs {ports}")
    for pdb in find(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        hits = [w for w in workloads
                if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        c.ok(len(hits) == 1, f"{name}: PDB {pdb['metadata']['name']} selects one workload")
    for w in workloads:
        sel = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        c.ok(all(labels.get(k) == v for k, v in sel.items()),
             f"{name}: {w['metadata']['name']} selector matches its pod labels")
    # Headless worker Service, named by the StatefulSet, resolved by the router.
    wsvc = find(docs, "Service", "spear-worker")[0]
    c.ok(wsvc["spec"].get("clusterIP") == "None", f"{name}: worker Service is headless")
    c.ok(worker["spec"]["serviceName"] == "spear-worker", f"{name}: StatefulSet serviceName")
    wc, rc = container(worker, "worker"), container(router, "router")
    wgrpc = next(p["port"] for p in wsvc["spec"]["ports"] if p["name"] == "grpc")
    dns = arg(rc, "--workers-dns") or ""
    c.ok(dns == f"spear-worker.$(POD_NAMESPACE).svc.cluster.local:{wgrpc}",
         f"{name}: router --workers-dns names the worker Service and its gRPC port", dns)
    c.ok(any(e["name"] == "POD_NAMESPACE" for e in rc.get("env", [])),
         f"{name}: router has POD_NAMESPACE for --workers-dns")
    # Flags agree with container ports; probes are gRPC health on that port.
    for cont, flagport, flagm in ((rc, "--port", "--metrics-port"), (wc, "--port", "--metrics-port")):
        ports = {p["name"]: p["containerPort"] for p in cont["ports"]}
        c.ok(str(ports.get("grpc")) == arg(cont, flagport), f"{name}: {cont['name']} --port = grpc port")
        c.ok(str(ports.get("metrics")) == arg(cont, flagm),
             f"{name}: {cont['name']} --metrics-port = metrics port")
        for probe in ("readinessProbe", "livenessProbe"):
            pr = cont.get(probe, {})
            c.ok(pr.get("grpc", {}).get("port") == ports.get("grpc"),
                 f"{name}: {cont['name']} {probe} is gRPC health on the gRPC port", str(pr))
    c.ok(wc.get("startupProbe", {}).get("grpc", {}).get("port") == wgrpc,
         f"{name}: worker startupProbe is gRPC health")
    c.ok(arg(wc, "--worker-id") == "$(POD_NAME)", f"{name}: worker id = pod name (adapter maps it)")
    # Engine threads = the CPU request (0 would mean every core of the node).
    c.ok(arg(wc, "--threads") == str(wc["resources"]["requests"]["cpu"]),
         f"{name}: worker --threads = its CPU request",
         f"{arg(wc, '--threads')} vs {wc['resources']['requests']['cpu']}")
    for flag in ("--model", "--host", "--threads", "--kv-tokens", "--max-batch-tokens",
                 "--max-waiting", "--itl-slo-ms"):
        c.ok(arg(wc, flag) is not None, f"{name}: worker {flag}")
    # Drain: preStop, then SIGTERM; grace > longest request + preStop.
    for w, cont in ((router, rc), (worker, wc)):
        cmd = " ".join(cont.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
        m = re.search(r"sleep (\d+)", cmd)
        c.ok(m is not None, f"{name}: {cont['name']} preStop hook", cmd)
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        c.ok(m is not None and grace > MAX_REQUEST_SECONDS + int(m.group(1)),
             f"{name}: {cont['name']} terminationGracePeriodSeconds {grace} > longest request "
             f"({MAX_REQUEST_SECONDS}) + preStop")
    # Drain timeouts cover the longest request; the router has the tokenizer.
    for cont in (rc, wc):
        c.ok(int(arg(cont, "--drain-timeout-s") or 0) >= MAX_REQUEST_SECONDS,
             f"{name}: {cont['name']} --drain-timeout-s >= longest request")
    c.ok(arg(rc, "--model") == "$(SPEAR_MODEL_SOURCE)", f"{name}: router --model (its tokenizer)")
    rinit = pod_spec(router).get("initContainers", [])
    c.ok([x["name"] for x in rinit] == ["tokenizer-prep"], f"{name}: router tokenizer-prep init container")
    c.ok(any(m["mountPath"] == "/models" for m in rc.get("volumeMounts", [])), f"{name}: router mounts /models")
    # Model preparation into the volume the worker reads.
    init = pod_spec(worker).get("initContainers", [])
    c.ok(len(init) == 1 and init[0]["name"] == "model-prep", f"{name}: model-prep init container")
    cms = {cm["metadata"]["name"]: cm for cm in find(docs, "ConfigMap")}
    c.ok("spear-model" in cms and "prepare-model.sh" in cms["spear-model"]["data"],
         f"{name}: ConfigMap spear-model with prepare-model.sh")
    if init:
        mounts = {m["name"]: m["mountPath"] for m in init[0]["volumeMounts"]}
        c.ok(mounts.get("models") == "/models", f"{name}: model-prep writes /models")
        script = cms.get("spear-model", {}).get("data", {}).get("prepare-model.sh", "")
        c.ok("spear quantize" in script and "spear pull" in script and "spear.json" in script,
             f"{name}: prepare-model.sh pulls, quantizes and checks the manifest")
    wmounts = {m["name"]: m for m in wc["volumeMounts"]}
    c.ok(wmounts.get("models", {}).get("mountPath") == "/models", f"{name}: worker mounts /models")
    # The worker labels metrics with the model directory's name: it must be
    # the public name the router uses (--model-name).
    c.ok(arg(wc, "--model") == "/models/served/$(SPEAR_MODEL_NAME)"
         and arg(rc, "--model-name") == "$(SPEAR_MODEL_NAME)",
         f"{name}: worker --model dir named like the router's --model-name",
         f"{arg(wc, '--model')} / {arg(rc, '--model-name')}")
    script = cms.get("spear-model", {}).get("data", {}).get("prepare-model.sh", "")
    c.ok('out="/models/served/${SPEAR_MODEL_NAME}"' in script, f"{name}: model-prep writes where the worker reads")
    vct = [v["metadata"]["name"] for v in worker["spec"].get("volumeClaimTemplates", [])]
    c.ok("models" in vct, f"{name}: models volumeClaimTemplate")
    return router, worker


for name in ("base", "overlays/cpu", "overlays/gpu"):
    if name in rendered:
        check_cluster(name, rendered[name])

# GPU overlay: GPUs requested (= TP size), on GPU nodes; CPU overlay: none.
if "overlays/gpu" in rendered:
    w = find(rendered["overlays/gpu"], "StatefulSet", "spear-worker")[0]
    res = container(w, "worker")["resources"]
    c.ok(res.get("limits", {}).get("nvidia.com/gpu") == res.get("requests", {}).get("nvidia.com/gpu")
         and int(res["limits"]["nvidia.com/gpu"]) >= 1, "gpu: nvidia.com/gpu requested = limited >= 1")
    c.ok(pod_spec(w).get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true",
         "gpu: GPU node selector")
    c.ok(any(t.get("key") == "nvidia.com/gpu" for t in pod_spec(w).get("tolerations", [])),
         "gpu: GPU taint tolerated")
if "overlays/cpu" in rendered:
    w = find(rendered["overlays/cpu"], "StatefulSet", "spear-worker")[0]
    txt = json.dumps(w)
    c.ok("nvidia.com/gpu" not in txt, "cpu: no GPU request, selector or toleration")

# Autoscaling objects target what the cluster renders and read metrics the
# adapter defines.
adapter_names = {r["name"]["as"] for r in L.adapter_rules()}
gpu_docs = rendered.get("overlays/gpu", [])
for name in ("autoscaling/hpa", "autoscaling/keda"):
    for d in rendered.get(name, []):
        ref = d["spec"]["scaleTargetRef"]
        c.ok(len(find(gpu_docs, ref["kind"], ref["name"])) == 1,
             f"{name}: scale target {ref['kind']}/{ref['name']} exists")
for d in rendered.get("autoscaling/hpa", []):
    kinds = set()
    for m in d["spec"]["metrics"]:
        src = m[m["type"].lower()]
        kinds.add(m["type"])
        c.ok(src["metric"]["name"] in adapter_names,
             f"hpa: metric {src['metric']['name']} is exposed by the adapter rules")
        if m["type"] == "Object":
            obj = src["describedObject"]
            c.ok(len(find(gpu_docs, obj["kind"], obj["name"])) == 1,
                 f"hpa: described object {obj['kind']}/{obj['name']} exists")
    c.ok(kinds == {"Pods", "Object"}, "hpa: Pods and Object metrics", str(kinds))
    c.ok(d["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300,
         "hpa: slow scale-down")
# ServiceMonitors select the Services and name the jobs the rules expect.
for sm in [d for d in rendered.get("monitoring", []) if d["kind"] == "ServiceMonitor"]:
    sel = sm["spec"]["selector"]["matchLabels"]
    svcs = [d for d in gpu_docs if d["kind"] == "Service"
            and all(d["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    c.ok(len(svcs) == 1, f"monitoring: ServiceMonitor {sm['metadata']['name']} selects one Service")
    if svcs:
        c.ok(svcs[0]["metadata"]["labels"].get(sm["spec"]["jobLabel"]) == sm["metadata"]["name"],
             f"monitoring: {sm['metadata']['name']} job label")
        c.ok(sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svcs[0]["spec"]["ports"]],
             f"monitoring: {sm['metadata']['name']} scrapes a named port")
pr = [d for d in rendered.get("monitoring", []) if d["kind"] == "PrometheusRule"]
want = [g for f in L.RULE_FILES for g in L.yaml.safe_load(open(f))["groups"]]
c.ok(len(pr) == 1 and pr[0]["spec"]["groups"] == want,
     "monitoring: PrometheusRule = monitoring/prometheus rules (run generate_prometheusrule.py)")
c.ok(adapter_names >= {"spear_queue_depth", "spear_predicted_ttft_seconds",
                       "spear_ttft_p90_seconds", "spear_slo_violation_ratio"},
     "adapter exposes queue, predicted TTFT, TTFT p90 and SLO signals", str(adapter_names))
c.exit()
