#!/usr/bin/env bash
# Opcode histogram of one kernel's SASS (needs cuobjdump, i.e. the CUDA
# toolkit, on the machine that runs it).
# usage: scripts/gpu/sass_hist.sh BINARY FUNCTION_NAME_SUBSTRING
set -uo pipefail
bin=$1 fun=$2
command -v cuobjdump >/dev/null || PATH=$PATH:/usr/local/cuda/bin
command -v cuobjdump >/dev/null || { echo "no cuobjdump"; exit 0; }
cuobjdump -sass "$bin" | awk -v f="$fun" '
  /Function :/ { on = index($0, f) > 0; if (on) print }
  on && /\/\*[0-9a-f]+\*\// { op = $2; if (op ~ /^@/) op = $3; sub(/\..*/, "", op); sub(/;$/, "", op); n[op]++; tot++ }
  END { for (o in n) printf "%6d %s\n", n[o], o; printf "%6d total\n", tot }' | sort -rn
