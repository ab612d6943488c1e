#!/usr/bin/env bash
# Several rows of the issue-3 quality table at once, for a many-core host
# (e.g. the CPU side of the lent GPU machine): every row quantizes with its
# own `spear quantize --threads T --time-budget B`, all rows in parallel,
# then scores its model on both texts with `spear eval --json`.
#
#   scripts/eval/quality_rows.sh OUTDIR SRC WIKI HANDBOOK [ROW...]
#
# ROW names (default: all of them):
#   rtn-b0.25 rtn-b0.5 rtn-b1 rtn-b2   SPEAR on RTN per-channel at that budget
#   rtn-nogate                         SPEAR 1 %, gate fixed at 1 (same training)
#   rtn-static                         static closed form, SPEAR's placement, 1 %
#   g128-spear                         SPEAR 1 % on RTN group 128
#   gptq gptq-spear awq awq-spear      the GPTQ / AWQ backbones without / with SPEAR 1 %
# Env: SPEAR (the CLI, default build/cli/spear), T (threads per row, 2),
# BUDGET (seconds of calibration + fitting per row, 900), TOKENS (scored
# tokens per text, 16384), CTX (512), CALIB (default: spear quantize's),
# EXTRA (more `spear quantize` flags for every row, e.g. "--mse-weight 1").
# Writes OUTDIR/ROW.quantize.log, OUTDIR/ROW.{wiki,hb}.json and, at the end,
# OUTDIR/rows.csv (row,wikitext,handbook,ec_pct,quantize_seconds).
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 2,20p "$0" >&2; exit 2; }
OUT=$1 SRC=$2 WIKI=$3 HB=$4
shift 4
SPEAR=${SPEAR:-build/cli/spear}
T=${T:-2} BUDGET=${BUDGET:-900} TOKENS=${TOKENS:-16384} CTX=${CTX:-512}
for f in "$SRC" "$WIKI" "$HB"; do [[ -e $f ]] || { echo "quality_rows.sh: $f missing" >&2; exit 2; }; done
[[ -x $SPEAR ]] || { echo "quality_rows.sh: $SPEAR not built" >&2; exit 2; }
mkdir -p "$OUT"

args_of() {
  case $1 in
    rtn-b0.25) echo "--method rtn --ec spear --ec-budget 0.25" ;;
    rtn-b0.5) echo "--method rtn --ec spear --ec-budget 0.5" ;;
    rtn-b1) echo "--method rtn --ec spear --ec-budget 1.0" ;;
    rtn-b2) echo "--method rtn --ec spear --ec-budget 2.0" ;;
    rtn-nogate) echo "--method rtn --ec spear --ec-budget 1.0 --no-gate" ;;
    rtn-static) echo "--method rtn --ec static --ec-budget 1.0" ;;
    g128-spear) echo "--method rtn --group 128 --ec spear --ec-budget 1.0" ;;
    gptq) echo "--method gptq --ec none" ;;
    gptq-spear) echo "--method gptq --ec spear --ec-budget 1.0" ;;
    awq) echo "--method awq --ec none" ;;
    awq-spear) echo "--method awq --ec spear --ec-budget 1.0" ;;
    *) return 1 ;;
  esac
}

ROWS=("$@")
((${#ROWS[@]})) || ROWS=(rtn-b0.25 rtn-b0.5 rtn-b1 rtn-b2 rtn-nogate rtn-static g128-spear gptq
  gptq-spear awq awq-spear)
for r in "${ROWS[@]}"; do args_of "$r" >/dev/null || { echo "quality_rows.sh: unknown row $r" >&2; exit 2; }; done

row() {
  local r=$1 m="$OUT/$1.spear" calib=()
  [[ -n ${CALIB:-} ]] && calib=(--calib "$CALIB")
  # shellcheck disable=SC2046
  "$SPEAR" quantize --model "$SRC" --out "$m" --force --threads "$T" --time-budget "$BUDGET" \
    "${calib[@]}" $(args_of "$r") ${EXTRA:-} >"$OUT/$r.quantize.log" 2>&1 || { echo "$r: quantize failed" >&2; return 1; }
  "$SPEAR" eval --model "$m" --text "$WIKI" --ctx "$CTX" --max-tokens "$TOKENS" \
    --threads "$T" --json >"$OUT/$r.wiki.json" 2>"$OUT/$r.eval.err" || { echo "$r: eval failed" >&2; return 1; }
  "$SPEAR" eval --model "$m" --text "$HB" --ctx "$CTX" --max-tokens "$TOKENS" \
    --threads "$T" --json >"$OUT/$r.hb.json" 2>>"$OUT/$r.eval.err" || { echo "$r: eval failed" >&2; return 1; }
  echo "$r done at $(date -u +%H:%M:%S)"
}

pids=()
for r in "${ROWS[@]}"; do row "$r" & pids+=($!); done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done

python3 - "$OUT" "${ROWS[@]}" <<'EOF'
import json, os, re, sys
out, rows = sys.argv[1], sys.argv[2:]
lines = ["row,wikitext,handbook,ec_pct,quantize_seconds"]
for r in rows:
    try:
        w = json.load(open(os.path.join(out, r + ".wiki.json")))
        h = json.load(open(os.path.join(out, r + ".hb.json")))
        diag = json.load(open(os.path.join(out, r + ".spear", "spear.json")))["provenance"]["diagnostic"]
    except (OSError, ValueError, KeyError):
        lines.append(f"{r},,,,")
        continue
    log = open(os.path.join(out, r + ".quantize.log"), errors="replace").read()
    sec = re.findall(r"quantized in ([0-9.]+) s", log)
    lines.append(f"{r},{w['ppl']:.4f},{h['ppl']:.4f},{diag.get('ec_pct', 0):.3f},"
                 f"{sec[-1] if sec else ''}")
open(os.path.join(out, "rows.csv"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $fail
