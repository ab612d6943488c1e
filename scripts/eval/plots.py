#!/usr/bin/env python3
"""The issue-3 plots (docs/results/img/*.png) from the committed result data.

  scripts/eval/plots.py [--data docs/results/data] [--out docs/results/img]
                        [--spear MODEL.spear]

Inputs (all small CSVs under --data, written by the runs in quality.md):
  quality_rows.csv   group,setting,wikitext,handbook,ec_pct — one row per
                     measured setting (perplexities on the first 16,384
                     tokens of each text, ctx 512)
  smollm2_gates_spear_1pct.csv
                     per token: KL(FP16 || model) without / with the ECs and
                     the mean gate (the probe's --dump-gates)
  smollm2_damage.csv module,damage,rank — the CKA diagnostic per module;
                     written from a .spear's manifest with --spear
Outputs: perplexity.png, gate_vs_error.png, damage.png.
"""
import argparse
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def damage_from_spear(spear_dir, out_csv):
    """Writes module,damage,rank from the diagnostic in a .spear manifest."""
    with open(os.path.join(spear_dir, "spear.json")) as f:
        manifest = json.load(f)
    prov = manifest.get("provenance", {})
    diag = prov.get("diagnostic")
    if isinstance(diag, str):
        diag = json.loads(diag)
    if not diag or "modules" not in diag:
        sys.exit(f"plots.py: {spear_dir} has no diagnostic in its provenance")
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["module", "damage", "rank"])
        for m in diag["modules"]:
            w.writerow([m["name"], f"{m['damage']:.6g}", m["rank"]])


def plot_perplexity(rows, out):
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.5))
    labels = [f"[{r['group']}] {r['setting']}" for r in rows]
    y = range(len(rows))
    # An empty cell (a text not scored for that row) draws no bar.
    wt = [float(r["wikitext"]) if r["wikitext"] else 0.0 for r in rows]
    hb = [float(r["handbook"]) if r["handbook"] else 0.0 for r in rows]
    ax.barh([i - 0.2 for i in y], wt, height=0.4, label="WikiText-2 test", color="#4c72b0")
    ax.barh([i + 0.2 for i in y], hb, height=0.4, label="Debian Administrator's Handbook",
            color="#dd8452")
    for i, (a, b) in enumerate(zip(wt, hb)):
        if a:
            ax.text(a + 0.3, i - 0.2, f"{a:.2f}", va="center", fontsize=7)
        if b:
            ax.text(b + 0.3, i + 0.2, f"{b:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (first 16,384 tokens, ctx 512; lower is better)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity per setting")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max(wt + hb) * 1.12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_gate(rows, out):
    g = [float(r["mean_gate"]) for r in rows]
    kw = [float(r["kl_without_ec"]) for r in rows]
    kc = [float(r["kl_with_ec"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.scatter(g, kw, s=5, alpha=0.45, label="W4 backbone (every B = 0)", color="#c44e52")
    ax.scatter(g, kc, s=5, alpha=0.45, label="W4 + SPEAR ECs", color="#4c72b0")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("mean gate over ECs and coordinates (1 = static correction)")
    ax.set_ylabel("per-token KL(FP16 || model)")
    ax.set_title("per-token output error against the gate")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.scatter(g, [a - b for a, b in zip(kw, kc)], s=5, alpha=0.45, color="#55a868")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("mean gate")
    ax.set_ylabel("KL removed by the ECs (without − with)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(f"{len(rows)} WikiText-2 tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_damage(rows, out):
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    colors = dict(zip(kinds, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, r in enumerate(rows):
        kind = next((k for k in kinds if r["module"].endswith(k)), None)
        d = float(r["damage"])
        ax.bar(i, d, color=colors.get(kind, "gray"), edgecolor="k" if int(r["rank"]) > 0 else "none",
               linewidth=0.6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="k"))
    ax.legend(handles, kinds + ["black edge: has an EC"], fontsize=7, ncol=4)
    ax.set_yscale("log")
    ax.set_xlabel("module (layer order: q k v o gate up down per layer)")
    ax.set_ylabel("damage = 1 − CKA(final hidden, FP16)")
    ax.set_title("CKA diagnostic: damage per module when only that module is W4 (RTN per-channel)")
    ax.set_xlim(-1, len(rows))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="docs/results/data")
    ap.add_argument("--out", default="docs/results/img")
    ap.add_argument("--spear", help="a .spear whose diagnostic becomes smollm2_damage.csv")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dmg = os.path.join(a.data, "smollm2_damage.csv")
    if a.spear:
        damage_from_spear(a.spear, dmg)
    done = []
    rows = os.path.join(a.data, "quality_rows.csv")
    if os.path.exists(rows):
        plot_perplexity(read_csv(rows), os.path.join(a.out, "perplexity.png"))
        done.append("perplexity.png")
    gates = os.path.join(a.data, "smollm2_gates_spear_1pct.csv")
    if os.path.exists(gates):
        plot_gate(read_csv(gates), os.path.join(a.out, "gate_vs_error.png"))
        done.append("gate_vs_error.png")
    if os.path.exists(dmg):
        plot_damage(read_csv(dmg), os.path.join(a.out, "damage.png"))
        done.append("damage.png")
    if not done:
        sys.exit(f"plots.py: no input CSV under {a.data}")
    print("wrote", ", ".join(os.path.join(a.out, d) for d in done))


if __name__ == "__main__":
    main()
