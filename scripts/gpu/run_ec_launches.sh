#!/usr/bin/env bash
# Runs on the GPU machine from the repository root with the bundle carried
# (SPEAR_BUNDLE_DIR, default .bundle; made by `scripts/gpu/bundle.sh
# spear_bench_decode_cuda`, with the placements copied into it): the decode
# step, W4 and W4+EC alternating (variants 0,9,0,9), at each EC placement
# given, into one file ($OUT/ec_launches.md: the tool brings back few files).
# A placement is NAME=DIR[:PCT]: DIR a .spear manifest's directory (relative to
# the bundle), PCT the bench's --ec-pct (default: the checkpoint's own EC %);
# scripts/eval/ec_launch_placements.py writes such DIRs and PCTs. The ECs take
# the checkpoint's factor storage (int8 for an --ec-factors i8 checkpoint, at
# the ranks its budget buys; SPEAR_EC_FORM=--ec-fp16 gives the fp16 mapping of
# the runs before v57, docs/results/gpu.md). Runs stop
# being started once SPEAR_LAUNCH_DEADLINE seconds (default 400) have passed.
# usage: scripts/gpu/run_ec_launches.sh MODELS NAME=DIR[:PCT]...   (MODELS: 8B, 1B or 8B,1B)
set -uo pipefail
OUT=${OUT:-gpu-out}
BUNDLE=${SPEAR_BUNDLE_DIR:-.bundle}
(($# >= 2)) || { echo "usage: $0 MODELS NAME=DIR[:PCT]..." >&2; exit 2; }
models=$1
shift
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
A="$OUT/ec_launches.md"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; } \
  | tee "$A"
t0=$(date +%s) rc=0
for spec in "$@"; do
  name=${spec%%=*} rest=${spec#*=}
  dir=${rest%%:*} pct=
  [[ $rest == *:* ]] && pct=--ec-pct=${rest#*:}
  if (($(date +%s) - t0 > ${SPEAR_LAUNCH_DEADLINE:-400})); then
    echo "$name skipped (deadline)" | tee -a "$A"
    continue
  fi
  [[ -f "$BUNDLE/$dir/spear.json" ]] || { echo "$name: no $BUNDLE/$dir/spear.json" | tee -a "$A"; rc=2; continue; }
  echo "### $name ($dir $pct)" >>"$A"
  s=$(date +%s)
  timeout "${SPEAR_BENCH_TIMEOUT:-150}" "$BUNDLE"/bin/spear_bench_decode_cuda --models="$models" \
    --batches=1,8 --variants=0,9,0,9 --ec-placement="$BUNDLE/$dir" $pct ${SPEAR_EC_FORM:-} >>"$A" 2>&1
  r=$?
  ((r == 0)) || rc=1
  echo "$name: $(($(date +%s) - s)) s, rc $r" | tee -a "$A"
done
grep -E "^### |EC placement|^\| " "$A"
exit $rc
