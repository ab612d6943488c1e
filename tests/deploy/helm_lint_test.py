#!/usr/bin/env python3
"""Lint of the Helm chart deploy/k8s/helm/spear without a helm binary:
- template actions are balanced ({{ }} pairs; if/range/with/define/block
  ... end), and each template is YAML once its actions are blanked out;
- every .Values reference exists in values.yaml; values-cpu.yaml only sets
  keys values.yaml has; every value in values.yaml is commented;
- names, labels, ports, flags and defaults agree with the Kustomize tree
  (values.yaml = overlays/gpu, values-cpu.yaml = overlays/cpu,
  autoscaling.* = deploy/k8s/autoscaling/hpa)."""
import glob
import os
import re
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

c = L.Checks("helm_lint_test")
TPL_DIR = os.path.join(L.CHART, "templates")
templates = sorted(glob.glob(os.path.join(TPL_DIR, "*")))
values = yaml.safe_load(open(os.path.join(L.CHART, "values.yaml")))
values_cpu = yaml.safe_load(open(os.path.join(L.CHART, "values-cpu.yaml")))
chart = yaml.safe_load(open(os.path.join(L.CHART, "Chart.yaml")))
c.ok(chart.get("apiVersion") == "v2" and chart.get("name") == "spear", "Chart.yaml apiVersion v2, name spear")
c.ok(all(k in chart for k in ("version", "appVersion", "description")), "Chart.yaml version/appVersion/description")

ACTION = re.compile(r"\{\{-?(.*?)-?\}\}", re.S)
OPENERS = ("if", "range", "with", "define", "block")


def check_balance(path, text):
    name = os.path.basename(path)
    ok = c.ok(text.count("{{") == text.count("}}"), f"{name}: '{{{{' and '}}}}' balanced",
              f"{text.count('{{')} vs {text.count('}}')}")
    stack = []
    for m in ACTION.finditer(text):
        body = m.group(1).strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                ok = c.ok(False, f"{name}: comment action closed", body[:40])
            continue
        if "{{" in body:
            ok = c.ok(False, f"{name}: nested '{{{{' inside an action", body[:60])
        word = body.split()[0] if body.split() else ""
        line = text[: m.start()].count("\n") + 1
        if word in OPENERS:
            stack.append((word, line))
        elif word == "else":
            if not stack or stack[-1][0] not in ("if", "range", "with"):
                ok = c.ok(False, f"{name}:{line}: else outside if/range/with")
        elif word == "end":
            if not stack:
                ok = c.ok(False, f"{name}:{line}: end without opener")
            else:
                stack.pop()
    if stack:
        ok = c.ok(False, f"{name}: unclosed {stack}")
    return ok


def values_paths(text):
    return set(re.findall(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))


def has_path(tree, dotted):
    cur = tree
    for part in dotted.strip(".").split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def blank_actions(text):
    """Template -> plain YAML: lines that are only actions go, inline
    actions become a scalar."""
    out = []
    for line in text.split("\n"):
        stripped = ACTION.sub("", line).strip()
        if not stripped and "{{" in line:
            continue
        out.append(ACTION.sub("X", line))
    return "\n".join(out)


# --- actions, YAML shape, .Values references --------------------------------------
all_refs = set()
for path in templates:
    text = open(path).read()
    check_balance(path, text)
    refs = values_paths(text)
    all_refs |= refs
    for r in sorted(refs):
        c.ok(has_path(values, r), f"{os.path.basename(path)}: .Values{r} exists in values.yaml")
    if path.endswith(".yaml"):
        try:
            docs = [d for d in yaml.safe_load_all(blank_actions(text)) if d]
            c.ok(all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs),
                 f"{os.path.basename(path)}: YAML objects with apiVersion and kind")
        except yaml.YAMLError as e:
            c.ok(False, f"{os.path.basename(path)}: YAML once actions are blanked", str(e))
c.ok(len(all_refs) > 40, "templates reference values", str(len(all_refs)))

# Negative controls for the balance check.
probe = L.Checks("control", quiet=True)
saved = c
c = probe
check_balance("control-unclosed.yaml", "{{- if .Values.a }}\nx: 1\n")
check_balance("control-braces.yaml", "x: {{ .Values.a }\n")
c = saved
c.ok(len(probe.failed) >= 2, "balance check rejects an unclosed if and a broken action (negative control)")


# --- values.yaml ----------------------------------------------------------------------
def leaves(tree, prefix=""):
    for k, v in tree.items():
        p = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            yield from leaves(v, p)
        else:
            yield p


def key_paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from key_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


for p in key_paths(values_cpu):
    cur, ok = values, True
    for part in p:
        if not isinstance(cur, dict) or part not in cur:
            ok = False
            break
        cur = cur[part]
    c.ok(ok, f"values-cpu.yaml: {'.'.join(p)} exists in values.yaml")

# Every value commented: each key line has a comment right above it, or an
# ancestor does (a commented map passed through whole, e.g. resources).
lines = open(os.path.join(L.CHART, "values.yaml")).read().split("\n")
stack = []  # (indent, key, commented)
key_re = re.compile(r"^(\s*)(-\s+)?([A-Za-z0-9_.\/-]+):")
for i, line in enumerate(lines):
    m = key_re.match(line)
    if not m or line.strip().startswith("#"):
        continue
    indent = len(m.group(1)) + (len(m.group(2)) if m.group(2) else 0)
    while stack and stack[-1][0] >= indent:
        stack.pop()
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    commented = j >= 0 and lines[j].strip().startswith("#")
    k = i + 1
    while k < len(lines) and (not lines[k].strip() or lines[k].strip().startswith("#")):
        k += 1
    is_section = line.rstrip().endswith(":") and k < len(lines) and \
        len(lines[k]) - len(lines[k].lstrip()) > indent
    ok = commented or is_section or any(s[2] for s in stack)
    c.ok(ok, f"values.yaml:{i + 1}: '{m.group(3)}' is commented")
    stack.append((indent, m.group(3), commented))
unused = [p for p in leaves(values)
          if not any(p == r or p.startswith(r + ".") or r.startswith(p + ".") for r in all_refs)]
c.ok(not unused, "every values.yaml value is used by a template", str(unused))

# --- agreement with the Kustomize tree ---------------------------------------------------
base = L.kustomize_build(os.path.join(L.KUSTOMIZE, "base"))
gpu = L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "gpu"))
cpu = L.kustomize_build(os.path.join(L.KUSTOMIZE, "overlays", "cpu"))
hpa = L.kustomize_build(os.path.join(L.AUTOSCALING, "hpa"))
keda = L.kustomize_build(os.path.join(L.AUTOSCALING, "keda"))

# Resource names: release "spear" -> fullname "spear" (helpers); suffixes.
helpers = open(os.path.join(TPL_DIR, "_helpers.tpl")).read()
suffix = {n: s for n, s in re.findall(r'define "spear\.(\w+Name)".*?printf "%s-(\w+)"', helpers, re.S)}
c.ok(suffix == {"routerName": "router", "workerName": "worker", "modelConfigName": "model"},
     "helpers name router/worker/model as <fullname>-router|-worker|-model", str(suffix))
c.ok("contains $name .Release.Name" in helpers, "fullname is the release name when it contains 'spear'")
expected = {"routerName": "spear-router", "workerName": "spear-worker",
            "modelConfigName": "spear-model", "serviceAccountName": "spear", "fullname": "spear"}
chart_objs = set()
# Monitoring objects exist only in the chart (optional, off by default).
CHART_ONLY = ("servicemonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml")
for path in templates:
    text = open(path).read()
    if not path.endswith(".yaml") or os.path.basename(path) in CHART_ONLY:
        continue
    for doc in re.split(r"^---\s*$", text, flags=re.M):
        kind = re.search(r"^kind:\s*(\w+)", doc, re.M)
        name = re.search(r'^  name: \{\{ include "spear\.(\w+)" [.$] \}\}', doc, re.M)
        if kind and name:
            chart_objs.add((kind.group(1), expected[name.group(1)]))
        elif kind:
            c.ok(False, f"{os.path.basename(path)}: {kind.group(1)} named through a helper")
kust_objs = {(d["kind"], d["metadata"]["name"]) for d in base + hpa + keda}
c.ok(chart_objs == kust_objs,
     "chart and Kustomize (base + autoscaling) create the same objects",
     f"chart only {sorted(chart_objs - kust_objs)}, kustomize only {sorted(kust_objs - chart_objs)}")

# Labels: the chart's selector labels are the Kustomize common labels.
sel_keys = set(re.findall(r"^(app\.kubernetes\.io/[\w-]+):",
                          re.search(r'define "spear.selectorLabels".*?end', helpers, re.S).group(0), re.M))
kust_sel = set(next(d for d in base if d["kind"] == "Deployment")["spec"]["selector"]["matchLabels"])
c.ok(sel_keys | {"app.kubernetes.io/component"} == kust_sel, "selector label keys agree",
     f"{sel_keys} vs {kust_sel}")


def obj(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def cont(docs, kind, name, cname):
    return next(x for x in obj(docs, kind, name)["spec"]["template"]["spec"]["containers"]
                if x["name"] == cname)


def args(container):
    return dict(a[2:].split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


def merged(over):
    import copy
    out = copy.deepcopy(values)

    def merge(a, b):  # Helm's rules: maps merge, null deletes, the rest replaces
        for k, v in b.items():
            if v is None:
                a.pop(k, None)
            elif isinstance(v, dict) and v and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
    merge(out, over)
    return out


# Ports: values = Service ports = container ports of the base.
for comp, kind in (("router", "Deployment"), ("worker", "StatefulSet")):
    svc = obj(base, "Service", f"spear-{comp}")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    c.ok(values[comp]["port"] == ports["grpc"], f"{comp}.port = Kustomize Service grpc port",
         f"{values[comp]['port']} vs {ports['grpc']}")
    c.ok(values[comp]["metricsPort"] == ports["metrics"], f"{comp}.metricsPort = Kustomize metrics port")
    cports = {p["name"]: p["containerPort"] for p in cont(base, kind, f"spear-{comp}", comp)["ports"]}
    c.ok(cports == {"grpc": values[comp]["port"], "metrics": values[comp]["metricsPort"]},
         f"{comp}: container ports agree")

# Flags: the same set in template and Kustomize.
for comp, kind, tpl in (("router", "Deployment", "router-deployment.yaml"),
                        ("worker", "StatefulSet", "worker-statefulset.yaml")):
    text = open(os.path.join(TPL_DIR, tpl)).read()
    tflags = set(re.findall(r"^\s*- (--[a-z-]+)=", text, re.M))
    kflags = {"--" + k for k in args(cont(base, kind, f"spear-{comp}", comp))}
    always = {f for f in tflags if not re.search(
        r"\{\{- if [^}]*\}\}\s*\n(?:\s*- --[^\n]*\n)*?\s*- " + re.escape(f), text)}
    c.ok(always == kflags, f"{comp}: unconditional flags agree with Kustomize",
         f"{sorted(always)} vs {sorted(kflags)}")

# Profiles: chart defaults = overlays/gpu, values-cpu = overlays/cpu.
grace = values["drain"]["preStopSleepSeconds"] + values["drain"]["maxRequestSeconds"] + 30
for label, v, docs in (("values.yaml vs overlays/gpu", values, gpu),
                       ("values-cpu.yaml vs overlays/cpu", merged(values_cpu), cpu)):
    r, w = obj(docs, "Deployment", "spear-router"), obj(docs, "StatefulSet", "spear-worker")
    rc, wc = cont(docs, "Deployment", "spear-router", "router"), cont(docs, "StatefulSet", "spear-worker", "worker")
    wa = args(wc)
    checks = {
        "router.replicas": (v["router"]["replicas"], r["spec"]["replicas"]),
        "worker.replicas": (v["worker"]["replicas"], w["spec"]["replicas"]),
        "worker.threads": (str(v["worker"]["threads"]), wa["threads"]),
        "worker.kvTokens": (str(v["worker"]["kvTokens"]), wa["kv-tokens"]),
        "worker.maxBatchTokens": (str(v["worker"]["maxBatchTokens"]), wa["max-batch-tokens"]),
        "worker.maxWaiting": (str(v["worker"]["maxWaiting"]), wa["max-waiting"]),
        "worker.itlSloMs": (str(v["worker"]["itlSloMs"]), wa["itl-slo-ms"]),
        "router.resources": (v["router"]["resources"], rc["resources"]),
        "worker.nodeSelector": (v["worker"]["nodeSelector"], w["spec"]["template"]["spec"].get("nodeSelector", {})),
        "worker.tolerations": (v["worker"]["tolerations"], w["spec"]["template"]["spec"].get("tolerations", [])),
        "model.persistence.size": (v["model"]["persistence"]["size"],
                                   w["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]),
        "model.persistence.accessModes": (v["model"]["persistence"]["accessModes"],
                                          w["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"]),
        "router.prepResources": (v["router"]["prepResources"],
                                 r["spec"]["template"]["spec"]["initContainers"][0]["resources"]),
        "router.modelVolume": ({"name": "models", **v["router"]["modelVolume"]},
                               r["spec"]["template"]["spec"]["volumes"][0]),
        "drain timeout (router)": (str(v["drain"]["maxRequestSeconds"]), args(rc)["drain-timeout-s"]),
        "drain timeout (worker)": (str(v["drain"]["maxRequestSeconds"]), wa["drain-timeout-s"]),
        "model.prepResources": (v["model"]["prepResources"],
                                w["spec"]["template"]["spec"]["initContainers"][0]["resources"]),
        "grace period (router)": (grace, r["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]),
        "grace period (worker)": (grace, w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]),
        "router PDB minAvailable": (v["router"]["podDisruptionBudget"]["minAvailable"],
                                    obj(docs, "PodDisruptionBudget", "spear-router")["spec"]["minAvailable"]),
        "worker PDB maxUnavailable": (v["worker"]["podDisruptionBudget"]["maxUnavailable"],
                                      obj(docs, "PodDisruptionBudget", "spear-worker")["spec"]["maxUnavailable"]),
        "startup probe budget": (v["worker"]["startupSeconds"] // 10,
                                 wc["startupProbe"]["failureThreshold"]),
        "preStop sleep": (f"sleep {v['drain']['preStopSleepSeconds']}", wc["lifecycle"]["preStop"]["exec"]["command"][-1]),
    }
    wres = dict(wc["resources"])
    expect_res = {"requests": dict(v["worker"]["resources"]["requests"]),
                  "limits": dict(v["worker"]["resources"]["limits"])}
    if v["worker"]["gpu"]["enabled"]:
        for k in ("requests", "limits"):
            expect_res[k][v["worker"]["gpu"]["resourceName"]] = str(v["worker"]["tensorParallelSize"])
    checks["worker.resources (+ GPUs = TP size)"] = (expect_res, wres)
    cm = obj(docs, "ConfigMap", "spear-model")["data"]
    q = v["model"]["quantize"]
    qargs = (f"--method {q['method']} --group {q['group']} --ec {q['ec']} --ec-budget {q['ecBudget']} "
             f"--calib {q['calib']} {' '.join(q['extraArgs'])}").strip()
    checks["model.name"] = (v["model"]["name"], cm["SPEAR_MODEL_NAME"])
    checks["model.source"] = (v["model"]["source"], cm["SPEAR_MODEL_SOURCE"])
    checks["model.quantize -> SPEAR_QUANTIZE_ARGS"] = (qargs, cm["SPEAR_QUANTIZE_ARGS"])
    for what, (want, got) in checks.items():
        c.ok(want == got, f"{label}: {what}", f"chart {want!r} vs kustomize {got!r}")

# The init scripts of the chart's ConfigMap are the Kustomize ones.
tpl_cm = open(os.path.join(TPL_DIR, "configmap-model.yaml")).read()
scripts = re.findall(r"^  ([\w.-]+\.sh): \|\n((?:    .*\n|\n)*)", tpl_cm + "\n", re.M)
c.ok(len(scripts) == 2, "chart ConfigMap holds two init scripts", str([s[0] for s in scripts]))
for key, body in scripts:
    body = "\n".join(line[4:] for line in body.rstrip("\n").split("\n")) + "\n"
    c.ok(body == obj(base, "ConfigMap", "spear-model")["data"].get(key),
         f"{key} identical in chart and Kustomize")

# HPA: chart values = autoscaling/hpa.
h = hpa[0]["spec"]
a = values["autoscaling"]
c.ok(a["minReplicas"] == h["minReplicas"] and a["maxReplicas"] == h["maxReplicas"], "HPA min/max replicas")
targets = {m[m["type"].lower()]["metric"]["name"]: m[m["type"].lower()]["target"] for m in h["metrics"]}
want = {"spear_queue_depth": a["targets"]["queueDepthPerWorker"],
        "spear_predicted_ttft_seconds": a["targets"]["predictedTtftSeconds"],
        "spear_router_queue_depth": a["targets"]["routerQueueDepthPerWorker"],
        "spear_ttft_p90_seconds": a["targets"]["ttftP90Seconds"],
        "spear_ttft_slo_violation_ratio": a["targets"]["ttftSloViolationRatio"],
        "spear_slo_violation_ratio": a["targets"]["sloViolationRatio"]}
for name, val in want.items():
    t = targets.get(name, {})
    c.ok(str(t.get("averageValue", t.get("value"))) == str(val), f"HPA target {name}", f"{t} vs {val}")
hpa_tpl = open(os.path.join(TPL_DIR, "hpa.yaml")).read()
c.ok(set(re.findall(r"name: (spear_\w+)", hpa_tpl)) == set(targets), "HPA template reads the same metrics")
c.ok(h["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == a["scaleDownStabilizationSeconds"]
     and h["behavior"]["scaleDown"]["policies"][0]["periodSeconds"] == a["scaleDownPeriodSeconds"]
     and h["behavior"]["scaleUp"]["policies"][0]["value"] == a["scaleUpPodsPerMinute"],
     "HPA behavior = autoscaling values")
k = keda[0]["spec"]
kv = values["keda"]
c.ok(k["minReplicaCount"] == kv["minReplicas"] and k["maxReplicaCount"] == kv["maxReplicas"]
     and k["pollingInterval"] == kv["pollingInterval"], "KEDA replicas and polling = keda values")
thr = {t["name"]: t["metadata"]["threshold"] for t in k["triggers"]}
c.ok(thr == {"queue": kv["queueDepthPerWorker"], "ttft-p90": kv["ttftP90Seconds"],
             "slo-violations": kv["sloViolationRatio"]}, "KEDA thresholds = keda values", str(thr))
c.exit()
