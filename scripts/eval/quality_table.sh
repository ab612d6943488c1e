#!/usr/bin/env bash
# The issue-3 quality table: quantizes SmolLM2-135M-Instruct in every setting
# the report needs and scores them all on WikiText-2 and on the second text
# (The Debian Administrator's Handbook, scripts/eval/second_text.py), one
# `spear eval --models` table per text and group of rows.
#
#   scripts/eval/quality_table.sh [WORKDIR] [SET]
#
# WORKDIR (default ~/.cache/spear/quality) keeps the quantized models (a
# model that exists is reused unless FORCE=1) and the logs; SET picks rows:
#   headline  FP16, W4 RTN per-channel, +static on every module and +static
#             on SPEAR's placement (equal memory), +SPEAR 1%
#   backbones RTN g128, GPTQ and AWQ per-channel, each with and without SPEAR
#   sweep     SPEAR at 0.25 / 0.5 / 1 / 2 % budget
#   ablation  SPEAR 1% with the gate fixed at 1 (same training)
#   all       everything (default)
# Env: TOKENS (scored tokens per text, 0 = all; default 16384 as in quality.md), CTX (512),
# CALIB (default: spear quantize's own), THREADS (0 = all). Takes hours on 2 cores for
# `all`; each quantize prints its own per-stage timings into its log.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-$HOME/.cache/spear/quality}
SET=${2:-all}
SPEAR=${SPEAR:-${SPEAR_BUILD_DIR:-build}/cli/spear}
TOKENS=${TOKENS:-16384}
CTX=${CTX:-512}
CALIB=${CALIB:-}
THREADS=${THREADS:-0}
WIKI=../shared/data/wikitext-2-raw/wiki.test.raw
HB=$HOME/.cache/spear/texts/debian-handbook.txt
mkdir -p "$WORK/logs"
[[ -x "$SPEAR" ]] || { echo "quality_table.sh: $SPEAR not built (scripts/build.sh)" >&2; exit 1; }
[[ -f "$WIKI" ]] || { echo "quality_table.sh: $WIKI missing (../shared/data)" >&2; exit 1; }
[[ -f "$HB" ]] || python3 scripts/eval/second_text.py "$HB"
SRC=$("$SPEAR" pull smollm2-135m)

# quant NAME ARGS...: quantize SRC into $WORK/NAME.spear with ARGS (cached).
quant() {
  local name=$1; shift
  local out="$WORK/$name.spear"
  if [[ -f "$out/spear.json" && "${FORCE:-0}" != 1 ]]; then return; fi
  echo "== quantize $name: $*"
  local calib=()
  [[ -n $CALIB ]] && calib=(--calib "$CALIB")
  "$SPEAR" quantize --model "$SRC" --out "$out" --force "${calib[@]}" --threads "$THREADS" "$@" \
    2>&1 | tee "$WORK/logs/quantize-$name.log" | grep -vE '\r' || true
  [[ -f "$out/spear.json" ]] || { echo "quantize $name failed (see $WORK/logs)" >&2; exit 1; }
}

# table TITLE LABELS MODELS: one eval table per text.
table() {
  local title=$1 labels=$2 models=$3
  for text in "$WIKI" "$HB"; do
    local tn; tn=$(basename "$text")
    echo "== $title — $tn (ctx $CTX, tokens ${TOKENS/#0/all})"
    "$SPEAR" eval --models "$models" --labels "$labels" --text "$text" --ctx "$CTX" \
      --max-tokens "$TOKENS" --threads "$THREADS" 2>"$WORK/logs/eval-$title-$tn.err" \
      | tee "$WORK/logs/eval-$title-$tn.txt"
  done
}

W=$WORK
if [[ $SET == headline || $SET == all ]]; then
  quant w4-rtn --method rtn --ec none
  quant w4-rtn-static-all --method rtn --ec static-all --ec-budget 1.0
  quant w4-rtn-static --method rtn --ec static --ec-budget 1.0
  quant w4-rtn-spear --method rtn --ec spear --ec-budget 1.0
  table headline FP16,W4,W4+static-all,W4+static,W4+SPEAR \
    "$SRC,$W/w4-rtn.spear,$W/w4-rtn-static-all.spear,$W/w4-rtn-static.spear,$W/w4-rtn-spear.spear"
fi
if [[ $SET == backbones || $SET == all ]]; then
  quant w4-rtn-g128 --method rtn --group 128 --ec none
  quant w4-rtn-g128-spear --method rtn --group 128 --ec spear --ec-budget 1.0
  quant w4-gptq --method gptq --ec none
  quant w4-gptq-spear --method gptq --ec spear --ec-budget 1.0
  quant w4-awq --method awq --ec none
  quant w4-awq-spear --method awq --ec spear --ec-budget 1.0
  quant w4-rtn --method rtn --ec none
  table backbones FP16,W4-RTN,RTN-g128,RTN-g128+SPEAR,GPTQ,GPTQ+SPEAR,AWQ,AWQ+SPEAR \
    "$SRC,$W/w4-rtn.spear,$W/w4-rtn-g128.spear,$W/w4-rtn-g128-spear.spear,$W/w4-gptq.spear,$W/w4-gptq-spear.spear,$W/w4-awq.spear,$W/w4-awq-spear.spear"
fi
if [[ $SET == sweep || $SET == all ]]; then
  quant w4-rtn --method rtn --ec none
  for b in 0.25 0.5 1.0 2.0; do
    if [[ $b == 1.0 ]]; then quant w4-rtn-spear --method rtn --ec spear --ec-budget 1.0
    else quant "w4-rtn-spear-b$b" --method rtn --ec spear --ec-budget "$b"; fi
  done
  table sweep FP16,W4,SPEAR-0.25%,SPEAR-0.5%,SPEAR-1%,SPEAR-2% \
    "$SRC,$W/w4-rtn.spear,$W/w4-rtn-spear-b0.25.spear,$W/w4-rtn-spear-b0.5.spear,$W/w4-rtn-spear.spear,$W/w4-rtn-spear-b2.0.spear"
fi
if [[ $SET == ablation || $SET == all ]]; then
  quant w4-rtn --method rtn --ec none
  quant w4-rtn-spear --method rtn --ec spear --ec-budget 1.0
  quant w4-rtn-spear-nogate --method rtn --ec spear --ec-budget 1.0 --no-gate
  table ablation FP16,W4,SPEAR,SPEAR-gate=1 \
    "$SRC,$W/w4-rtn.spear,$W/w4-rtn-spear.spear,$W/w4-rtn-spear-nogate.spear"
fi
echo "== logs and tables in $WORK/logs"
