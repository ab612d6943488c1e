#!/usr/bin/env python3
"""Prometheus rules: `promtool check rules` on every rule file, `promtool
test rules` on the unit tests, and proof that the unit tests cover each
alert: every alert has a case where it fires and one where it does not, and
making any single alert never fire breaks the unit tests."""
import copy
import os
import shutil
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_lib as L  # noqa: E402

c = L.Checks("promtool_rules_test")
promtool = L.need_tool("promtool", "Debian package prometheus; scripts/setup.sh installs it")
TESTS = os.path.join(L.MONITORING, "prometheus", "tests", "alert_rules_test.yml")

r = L.run([promtool, "check", "rules"] + L.RULE_FILES)
c.ok(r.returncode == 0, "promtool check rules", r.stdout + r.stderr)
r = L.run([promtool, "check", "config", os.path.join(L.MONITORING, "prometheus", "prometheus.yml")])
c.ok(r.returncode == 0, "promtool check config prometheus.yml", r.stdout + r.stderr)
r = L.run([promtool, "test", "rules", TESTS])
c.ok(r.returncode == 0 and "SUCCESS" in r.stdout, "promtool test rules", r.stdout + r.stderr)

# Every alert: at least one firing case and one not-firing case.
alerts = [ru["alert"] for g in yaml.safe_load(open(L.RULE_FILES[1]))["groups"]
          for ru in g["rules"] if "alert" in ru]
c.ok(len(alerts) >= 10, "alert count", str(len(alerts)))
tests = yaml.safe_load(open(TESTS))["tests"]
firing, silent = set(), set()
for t in tests:
    for a in t.get("alert_rule_test", []):
        (firing if a.get("exp_alerts") else silent).add(a["alertname"])
for a in alerts:
    c.ok(a in firing, f"{a}: a unit test where it fires")
    c.ok(a in silent, f"{a}: a unit test where it does not fire")
c.ok(not (firing | silent) - set(alerts), "unit tests name only existing alerts",
     str((firing | silent) - set(alerts)))
for needed in ("SpearSLOBurnRateFast", "SpearSLOBurnRateSlow", "SpearQueueGrowing",
               "SpearWorkerDown", "SpearKVCacheExhausted"):
    c.ok(needed in alerts, f"required alert {needed} exists")

# Mutation check: an alert that can never fire must fail the unit tests.
with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(os.path.join(tmp, "tests"))
    shutil.copy(L.RULE_FILES[0], tmp)
    shutil.copy(TESTS, os.path.join(tmp, "tests"))
    original = yaml.safe_load(open(L.RULE_FILES[1]))
    for name in alerts:
        mutated = copy.deepcopy(original)
        for g in mutated["groups"]:
            for ru in g["rules"]:
                if ru.get("alert") == name:
                    ru["expr"] = "vector(0) > 1"
        with open(os.path.join(tmp, "alert_rules.yml"), "w") as f:
            yaml.safe_dump(mutated, f)
        r = L.run([promtool, "test", "rules", os.path.join(tmp, "tests", "alert_rules_test.yml")])
        c.ok(r.returncode != 0, f"{name} disabled: unit tests notice")
c.exit()
