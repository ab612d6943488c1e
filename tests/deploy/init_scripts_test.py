#!/usr/bin/env python3
"""The init containers' shell scripts (ConfigMap spear-model), run for real
under /bin/sh (dash) with a stand-in `spear` that records its calls and
writes what the real one would: the first start pulls and quantizes, the
next start reuses the volume, a change of quantization flags quantizes
again, a path source is not pulled, a failed quantization fails the init
container, and the tokenizer script pulls known names and rejects a missing
path. Also shellcheck on these scripts and scripts/monitor.sh."""
import os
import stat
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

c = L.Checks("init_scripts_test")
sh = L.need_tool("dash", "Debian package dash (/bin/sh on Debian)")
docs = L.kustomize_build(os.path.join(L.KUSTOMIZE, "base"))
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spear-model")
data = cm["data"]
FAKE_SPEAR = r'''#!/bin/sh
echo "$*" >>"$CALLS"
case "$1" in
  pull) echo "$SPEAR_HOME/models/$2/model.gguf" ;;
  quantize)
    [ -n "${FAIL_QUANTIZE:-}" ] && { echo "quantize failed" >&2; exit 1; }
    while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
    mkdir -p "$out" && echo '{"format": "spear"}' >"$out/spear.json" ;;
esac
'''

with tempfile.TemporaryDirectory() as tmp:
    models = os.path.join(tmp, "models")
    bindir = os.path.join(tmp, "bin")
    os.makedirs(models)
    os.makedirs(bindir)
    fake = os.path.join(bindir, "spear")
    open(fake, "w").write(FAKE_SPEAR)
    os.chmod(fake, stat.S_IRWXU)
    scripts = {}
    for key in ("prepare-model.sh", "prepare-tokenizer.sh"):
        c.ok(key in data, f"ConfigMap has {key}")
        path = os.path.join(tmp, key)
        # The only change: the volume's mount point.
        open(path, "w").write(data.get(key, "").replace("/models", models))
        scripts[key] = path

    def run(key, calls, **env):
        e = {k: v for k, v in data.items() if k.startswith("SPEAR_")}
        e.update(PATH=bindir + os.pathsep + os.environ["PATH"], CALLS=calls,
                 SPEAR_HOME=os.path.join(models, "cache"))
        e.update(env)
        r = subprocess.run([sh, scripts[key]], env=e, capture_output=True, text=True)
        return r.returncode, (open(calls).read().splitlines() if os.path.exists(calls) else []), r

    name = data["SPEAR_MODEL_NAME"]
    out = os.path.join(models, "served", name)
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c1"))
    c.ok(rc == 0, "first start succeeds", r.stderr)
    c.ok(len(calls) == 2 and calls[0] == f"pull {data['SPEAR_MODEL_SOURCE']}"
         and calls[1].startswith("quantize --model ") and f"--out {out}" in calls[1]
         and data["SPEAR_QUANTIZE_ARGS"] in calls[1], "first start: pull, then quantize with the flags",
         str(calls))
    c.ok(os.path.exists(os.path.join(out, "spear.json")), "first start: the .spear is in the volume")
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c2"))
    c.ok(rc == 0 and calls == [], "second start reuses the volume (no pull, no quantize)", str(calls))
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c3"), SPEAR_QUANTIZE_ARGS="--method gptq")
    c.ok(rc == 0 and any(x.startswith("quantize") and "--method gptq" in x for x in calls),
         "changed flags quantize again", str(calls))
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c4"), SPEAR_QUANTIZE_ARGS="--method gptq")
    c.ok(rc == 0 and calls == [], "... and are then reused", str(calls))
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c5"), SPEAR_MODEL_SOURCE="/data/m.gguf")
    c.ok(rc == 0 and calls and not any(x.startswith("pull") for x in calls)
         and "--model /data/m.gguf" in calls[0], "a path source is quantized without a pull", str(calls))
    rc, calls, r = run("prepare-model.sh", os.path.join(tmp, "c6"), SPEAR_MODEL_NAME="other",
                       FAIL_QUANTIZE="1")
    c.ok(rc != 0, "a failed quantization fails the init container")
    c.ok(not os.path.exists(os.path.join(models, "served", "other.prep")), "... and leaves no stamp")
    c.ok(os.path.exists(os.path.join(models, "served", name + ".prep")), "a stamp beside the served model")

    rc, calls, r = run("prepare-tokenizer.sh", os.path.join(tmp, "t1"))
    c.ok(rc == 0 and calls == [f"pull {data['SPEAR_MODEL_SOURCE']}"], "tokenizer: a known name is pulled",
         str(calls))
    rc, calls, r = run("prepare-tokenizer.sh", os.path.join(tmp, "t2"), SPEAR_MODEL_SOURCE="/nope/m.gguf")
    c.ok(rc != 0 and "mount it into the router" in r.stderr, "tokenizer: a missing path fails clearly",
         r.stderr)
    present = os.path.join(tmp, "present.gguf")
    open(present, "w").write("x")
    rc, calls, r = run("prepare-tokenizer.sh", os.path.join(tmp, "t3"), SPEAR_MODEL_SOURCE=present)
    c.ok(rc == 0 and calls == [], "tokenizer: a present path is used as is", str(calls))

    shellcheck = L.need_tool("shellcheck", "Debian package shellcheck; scripts/setup.sh installs it")
    r = L.run([shellcheck, "-s", "sh", scripts["prepare-model.sh"], scripts["prepare-tokenizer.sh"]])
    c.ok(r.returncode == 0, "shellcheck: init scripts", r.stdout)
    r = L.run([shellcheck, os.path.join(L.ROOT, "scripts", "monitor.sh")])
    c.ok(r.returncode == 0, "shellcheck: scripts/monitor.sh", r.stdout)
c.exit()
