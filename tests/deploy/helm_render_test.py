#!/usr/bin/env python3
"""Renders the Helm chart with Helm's own Go SDK (v4, through the PyPI
package helm-python-sdk: no helm binary needed) and checks the result:
- `helm lint` finds no error, with values.yaml and with values-cpu.yaml;
- every object of every profile validates with kubernetes-validate
  (strict; Kubernetes 1.27 and latest; CRDs through tests/deploy/schemas);
- the chart's defaults render exactly the objects of Kustomize
  overlays/gpu, values-cpu.yaml those of overlays/cpu, autoscaling.enabled
  the HPA of deploy/k8s/autoscaling/hpa and keda.enabled the ScaledObject of
  deploy/k8s/autoscaling/keda (Helm's own labels and the checksum annotation
  aside);
- options do what they say: TLS and auth (secrets, flags, TCP probes),
  tensorParallelSize (GPU requests), ServiceMonitors (job label), another
  release name (every name prefixed, the router's DNS name follows), and
  enabling both autoscalers fails."""
import copy
import json
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

helm = L.need_module("helm_python", "helm-python-sdk")
kv = L.need_module("kubernetes_validate", "kubernetes-validate")
import jsonschema  # noqa: E402
from kubernetes_validate import utils as kvu  # noqa: E402

c = L.Checks("helm_render_test")
SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
CRDS = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
        ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json"}
VERSIONS = ["1.27.0", kvu.latest_version()]
values_cpu = yaml.safe_load(open(os.path.join(L.CHART, "values-cpu.yaml")))


def render(vals=None, name="spear", ns="spear"):
    with helm.Chart.load(L.CHART) as ch:
        out = ch.render(vals or {}, name=name, namespace=ns)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, out


def validate_all(docs, label):
    for d in docs:
        where = f"{label}: {d['kind']}/{d['metadata']['name']}"
        key = (d.get("apiVersion"), d.get("kind"))
        if key in CRDS:
            try:
                jsonschema.validate(d, json.load(open(os.path.join(SCHEMAS, CRDS[key]))))
                c.ok(True, where)
            except jsonschema.ValidationError as e:
                c.ok(False, f"{where} schema", e.message)
            continue
        for v in VERSIONS:
            try:
                kv.validate(d, v, strict=True)
                c.ok(True, where)
            except kvu.ValidationError as e:
                c.ok(False, f"{where} valid for {v}", ".".join(map(str, e.path)) + ": " + e.message)
            except kvu.SchemaNotFoundError as e:
                c.ok(False, f"{where} schema for {v}", e.message)


HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version")


def normalize(d):
    d = copy.deepcopy(d)
    for k in HELM_ONLY_LABELS:
        d["metadata"].get("labels", {}).pop(k, None)
    tpl = d.get("spec", {}).get("template", {}).get("metadata", {})
    tpl.get("annotations", {}).pop("checksum/model", None)
    if "annotations" in tpl and not tpl["annotations"]:
        del tpl["annotations"]
    for vct in d.get("spec", {}).get("volumeClaimTemplates", []):
        vct["metadata"].pop("labels", None)  # Kustomize labels these too
    return d


def diff(a, b, path=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: {'kustomize' if k not in a else 'helm'} only")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: helm {json.dumps(a)[:120]} vs kustomize {json.dumps(b)[:120]}")
    return out


def same_objects(helm_docs, kust_docs, label):
    h = {(d["kind"], d["metadata"]["name"]): normalize(d) for d in helm_docs}
    k = {(d["kind"], d["metadata"]["name"]): normalize(d) for d in kust_docs}
    c.ok(set(h) == set(k), f"{label}: same objects", f"helm only {sorted(set(h) - set(k))}, "
         f"kustomize only {sorted(set(k) - set(h))}")
    for key in sorted(set(h) & set(k)):
        dd = diff(h[key], k[key])
        c.ok(not dd, f"{label}: {key[0]}/{key[1]} identical", "; ".join(dd[:6]))


def obj(docs, kind, name):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return hits[0] if hits else None


# --- lint ------------------------------------------------------------------------------
for label, vals in (("values.yaml", {}), ("values-cpu.yaml", values_cpu)):
    try:
        res = helm.lint(L.CHART, values=vals) if vals else helm.lint(L.CHART)
    except TypeError:
        res = helm.lint(L.CHART)
    errs = list(res.get("errors", [])) + [m for m in res.get("messages", []) if m.get("severity", 0) >= 3]
    c.ok(res.get("total_charts_linted") == 1 and not errs, f"helm lint ({label})", str(res))

# --- profiles = Kustomize -------------------------------------------------------------------
gpu_docs, raw = render()
validate_all(gpu_docs, "defaults")
same_objects(gpu_docs, L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "gpu")),
             "defaults vs overlays/gpu")
c.ok("spear/templates/NOTES.txt" in raw and "spear-router" in raw["spear/templates/NOTES.txt"],
     "NOTES.txt renders")
cpu_docs, _ = render(values_cpu)
validate_all(cpu_docs, "values-cpu")
same_objects(cpu_docs, L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "cpu")),
             "values-cpu vs overlays/cpu")

hpa_docs, _ = render({"autoscaling": {"enabled": True}})
validate_all(hpa_docs, "autoscaling.enabled")
same_objects([d for d in hpa_docs if d["kind"] == "HorizontalPodAutoscaler"],
             L.kustomize_build(os.path.join(L.AUTOSCALING, "hpa")), "HPA vs autoscaling/hpa")
c.ok("replicas" not in obj(hpa_docs, "StatefulSet", "spear-worker")["spec"],
     "autoscaling: the HPA owns the worker replica count")

keda_docs, _ = render({"keda": {"enabled": True}}, ns="spear")
validate_all(keda_docs, "keda.enabled")
same_objects([d for d in keda_docs if d["kind"] == "ScaledObject"],
             L.kustomize_build(os.path.join(L.AUTOSCALING, "keda")), "KEDA vs autoscaling/keda")

try:
    render({"autoscaling": {"enabled": True}, "keda": {"enabled": True}})
    c.ok(False, "autoscaling + keda together fail to render")
except Exception as e:  # noqa: BLE001 - the SDK raises its own error type
    c.ok("enable one" in str(e), "autoscaling + keda together fail with a clear message", str(e)[:200])

# --- options -----------------------------------------------------------------------------------
sm_docs, _ = render({"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}})
validate_all(sm_docs, "serviceMonitor.enabled")
for comp in ("router", "worker"):
    sm = obj(sm_docs, "ServiceMonitor", f"spear-{comp}")
    svc = obj(sm_docs, "Service", f"spear-{comp}")
    c.ok(sm is not None, f"ServiceMonitor spear-{comp}")
    if sm and svc:
        sel = sm["spec"]["selector"]["matchLabels"]
        c.ok(all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()),
             f"ServiceMonitor spear-{comp} selects its Service")
        c.ok(svc["metadata"]["labels"].get(sm["spec"]["jobLabel"]) == f"spear-{comp}",
             f"ServiceMonitor spear-{comp}: job label = spear-{comp} (as the rules expect)")
        c.ok(sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]],
             f"ServiceMonitor spear-{comp} scrapes a named Service port")
        c.ok(sm["metadata"]["labels"].get("release") == "kps", "ServiceMonitor extra labels")

# Rules and dashboard shipped by the chart = monitoring/ (copies in files/).
for rel, orig in (("recording_rules.yml", L.RULE_FILES[0]), ("alert_rules.yml", L.RULE_FILES[1]),
                  ("spear-overview.json", os.path.join(L.MONITORING, "grafana", "spear-overview.json"))):
    copy_path = os.path.join(L.CHART, "files", rel)
    c.ok(os.path.exists(copy_path) and open(copy_path).read() == open(orig).read(),
         f"chart files/{rel} is a copy of {os.path.relpath(orig, L.ROOT)}")
mon_docs, _ = render({"prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
                      "grafanaDashboard": {"enabled": True}})
validate_all(mon_docs, "prometheusRule+grafanaDashboard")
pr = obj(mon_docs, "PrometheusRule", "spear")
want_groups = [g for f in L.RULE_FILES for g in yaml.safe_load(open(f))["groups"]]
c.ok(pr is not None and pr["spec"]["groups"] == want_groups,
     "PrometheusRule holds exactly the recording and alert rules of monitoring/prometheus")
mon2, _ = render({"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}})
same_objects([d for d in mon2 if d["kind"] in ("ServiceMonitor", "PrometheusRule")],
             L.kustomize_build(os.path.join(L.KUSTOMIZE, "monitoring")),
             "monitoring objects vs kustomize/monitoring")
dcm = obj(mon_docs, "ConfigMap", "spear-dashboard")
c.ok(dcm is not None and dcm["metadata"]["labels"].get("grafana_dashboard") == "1"
     and json.loads(dcm["data"]["spear-overview.json"]) ==
     json.load(open(os.path.join(L.MONITORING, "grafana", "spear-overview.json"))),
     "dashboard ConfigMap holds the dashboard, labelled for Grafana's sidecar")
c.ok(obj(gpu_docs, "PrometheusRule", "spear") is None and obj(gpu_docs, "ConfigMap", "spear-dashboard") is None,
     "defaults: no PrometheusRule or dashboard ConfigMap")

tls_docs, _ = render({"router": {"tls": {"enabled": True, "mutual": True, "secretName": "tls-s"},
                                 "auth": {"enabled": True, "secretName": "auth-s"}}})
validate_all(tls_docs, "tls+auth")
r = obj(tls_docs, "Deployment", "spear-router")
rc = r["spec"]["template"]["spec"]["containers"][0]
args = rc["args"]
for flag in ("--tls-cert=/etc/spear/tls/tls.crt", "--tls-key=/etc/spear/tls/tls.key",
             "--tls-client-ca=/etc/spear/tls/ca.crt", "--auth-token-file=/etc/spear/auth/token"):
    c.ok(flag in args, f"tls+auth: router {flag}")
vols = {v["name"]: v for v in r["spec"]["template"]["spec"]["volumes"]}
c.ok(vols.get("tls", {}).get("secret", {}).get("secretName") == "tls-s", "tls: Secret volume")
c.ok(vols.get("auth", {}).get("secret", {}).get("secretName") == "auth-s", "auth: Secret volume")
mounts = {m["name"]: m["mountPath"] for m in rc["volumeMounts"]}
c.ok(mounts.get("tls") == "/etc/spear/tls" and mounts.get("auth") == "/etc/spear/auth", "tls+auth mounts")
c.ok("tcpSocket" in rc["readinessProbe"] and "tcpSocket" in rc["livenessProbe"],
     "tls: probes are TCP (Kubernetes gRPC probes cannot speak TLS)")
plain = obj(gpu_docs, "Deployment", "spear-router")["spec"]["template"]["spec"]["containers"][0]
c.ok(not any(a.startswith(("--tls", "--auth")) for a in plain["args"]), "defaults: no TLS/auth flags")

tp_docs, _ = render({"worker": {"tensorParallelSize": 4}})
w = obj(tp_docs, "StatefulSet", "spear-worker")["spec"]["template"]["spec"]["containers"][0]
c.ok(w["resources"]["limits"].get("nvidia.com/gpu") == "4" and
     w["resources"]["requests"].get("nvidia.com/gpu") == "4", "tensorParallelSize 4: 4 GPUs per pod")
c.ok("nvidia.com/gpu" not in json.dumps(obj(cpu_docs, "StatefulSet", "spear-worker")),
     "values-cpu: no GPU anywhere in the worker")

rel_docs, _ = render({}, name="prod", ns="llm")
names = sorted(d["metadata"]["name"] for d in rel_docs)
c.ok(all(n.startswith("prod-spear") for n in names), "release 'prod': names prefixed prod-spear", str(names))
rr = obj(rel_docs, "Deployment", "prod-spear-router")
if rr:
    a = rr["spec"]["template"]["spec"]["containers"][0]["args"]
    c.ok("--workers-dns=prod-spear-worker.$(POD_NAMESPACE).svc.cluster.local:50052" in a,
         "release 'prod': router resolves prod-spear-worker", str(a))
    c.ok(obj(rel_docs, "StatefulSet", "prod-spear-worker")["spec"]["serviceName"] == "prod-spear-worker",
         "release 'prod': StatefulSet serviceName")
grace_docs, _ = render({"drain": {"maxRequestSeconds": 1800, "preStopSleepSeconds": 5}})
for kind, name in (("Deployment", "spear-router"), ("StatefulSet", "spear-worker")):
    spec = obj(grace_docs, kind, name)["spec"]["template"]["spec"]
    c.ok(spec["terminationGracePeriodSeconds"] == 1835, f"drain 1800 s: {name} grace 1835")
    c.ok("--drain-timeout-s=1800" in spec["containers"][0]["args"], f"drain 1800 s: {name} --drain-timeout-s")
c.exit()
