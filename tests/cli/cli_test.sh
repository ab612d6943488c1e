#!/usr/bin/env bash
# Process-level checks of the `spear` command: exit codes and messages for
# bad command lines and bad model files (never a crash: a signal would give
# an exit status >= 128), and a real run on the tiny HF fixture.
# usage: cli_test.sh SPEAR_BINARY TESTDATA_DIR
set -uo pipefail
SPEAR=$1
DATA=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fails=0

# expect CODE PATTERN -- ARGS...: exit code CODE and stderr matching PATTERN.
expect() {
  local code=$1 pattern=$2
  shift 3
  "$SPEAR" "$@" >"$TMP/out" 2>"$TMP/err"
  local rc=$?
  if [[ $rc -ne $code ]] || ! grep -qiE -e "$pattern" "$TMP/err" "$TMP/out"; then
    echo "FAIL: spear $* -> rc=$rc (want $code), output:"; cat "$TMP/err" "$TMP/out" | head -5
    fails=$((fails + 1))
  else
    echo "ok: spear $* -> $rc"
  fi
}

expect 2 "usage" -- 
expect 2 "unknown command" -- frobnicate
expect 2 "unknown flag --bogus" -- eval --bogus 1
expect 2 "must be an integer" -- eval --model x --text y --ctx abc
expect 2 "must be in \[2," -- eval --model x --text y --ctx 1
expect 2 "needs a value" -- generate --model
expect 2 "--prompt or --prompt-ids is required" -- generate --model x
expect 2 "usage: spear pull" -- pull
expect 2 "unknown model" -- pull no-such-model
expect 1 "no such model" -- generate --model /no/such/dir --prompt hi
expect 2 "top-p must be in" -- generate --model x --prompt hi --top-p 0

# Bad model files: every one a clear error, exit 1.
printf 'GGUF' >"$TMP/short.gguf"
expect 1 "truncated|too short|unexpected end|eof" -- info --model "$TMP/short.gguf"
head -c 4096 /dev/urandom >"$TMP/random.gguf"
expect 1 "magic|not a gguf|invalid" -- info --model "$TMP/random.gguf"
mkdir -p "$TMP/hf_noconfig"
expect 1 "config.json" -- info --model "$TMP/hf_noconfig"
# a directory holding a GGUF (the model cache's layout): the error names the file
mkdir -p "$TMP/gguf_dir" && cp "$TMP/short.gguf" "$TMP/gguf_dir/model.gguf"
expect 1 "holds model.gguf" -- info --model "$TMP/gguf_dir"
expect 1 "holds model.gguf" -- eval --model "$TMP/gguf_dir" --text "$TMP/short.gguf"
mkdir -p "$TMP/hf_badjson" && echo '{"hidden_size": ' >"$TMP/hf_badjson/config.json"
expect 1 "json|parse" -- info --model "$TMP/hf_badjson"
mkdir -p "$TMP/hf_trunc" && cp "$DATA/golden/tiny_llama_untied/config.json" "$TMP/hf_trunc/"
head -c 1000 "$DATA/golden/tiny_llama_untied/model.safetensors" >"$TMP/hf_trunc/model.safetensors"
expect 1 "safetensors|truncated|offset|outside" -- generate --model "$TMP/hf_trunc" --prompt-ids "1 2"
mkdir -p "$TMP/hf_shape" && cp "$DATA/golden/tiny_llama_untied/model.safetensors" "$TMP/hf_shape/"
sed 's/"intermediate_size": 176/"intermediate_size": 177/' "$DATA/golden/tiny_llama_untied/config.json" >"$TMP/hf_shape/config.json"
expect 1 "shape" -- generate --model "$TMP/hf_shape" --prompt-ids "1 2"

# A real run on the tiny HF fixture (no tokenizer: token ids in and out).
expect 0 "prompt tokens" -- generate --model "$DATA/golden/tiny_llama_untied" --prompt-ids "1 5 9" --max-tokens 4
expect 2 "not a token id" -- generate --model "$DATA/golden/tiny_llama_untied" --prompt-ids "1 999" --max-tokens 4
expect 1 "no tokenizer" -- eval --model "$DATA/golden/tiny_llama_untied" --text "$DATA/golden/tiny_llama_untied/config.json"

# --device: a bad value is a usage error; cuda on a build or machine without
# CUDA is a runtime error (exit 1) naming why, before the model loads; auto
# runs (on the CPU here: a dense model, which the CUDA backend does not
# take, or no GPU); the backend is logged on stderr.
expect 2 "--device must be cpu, cuda or auto, got 'gpu'" -- generate --model x --prompt hi --device gpu
expect 2 "--device must be cpu, cuda or auto" -- eval --model x --text y --device GPU
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect 1 "device cuda: (this build has no CUDA backend|no (usable )?CUDA device)" -- \
    generate --model "$DATA/golden/tiny_llama_untied" --prompt-ids "1 5 9" --device cuda
  expect 1 "device cuda: (this build has no CUDA backend|no (usable )?CUDA device)" -- \
    bench --model "$DATA/golden/tiny_llama_untied" --device cuda
fi
expect 0 "backend cpu: " -- generate --model "$DATA/golden/tiny_llama_untied" --prompt-ids "1 5 9" --max-tokens 4 --device auto

# spear quantize: bad flags exit 2 before any work; --out protection.
TINY="$DATA/golden/tiny_llama_untied"
expect 2 "--model is required" -- quantize --out "$TMP/q"
expect 2 "--out is required" -- quantize --model "$TINY"
expect 2 "--method must be rtn, awq or gptq" -- quantize --model "$TINY" --out "$TMP/q" --method foo
expect 2 "--group must be -1" -- quantize --model "$TINY" --out "$TMP/q" --group 48
expect 2 "--ec must be spear, static, static-all or none" -- quantize --model "$TINY" --out "$TMP/q" --ec lora
expect 2 "--ec-budget must be in" -- quantize --model "$TINY" --out "$TMP/q" --ec-budget -1
expect 2 "--ec-budget must be a number" -- quantize --model "$TINY" --out "$TMP/q" --ec-budget lots
expect 2 "--calib must be self:N,LEN" -- quantize --model "$TINY" --out "$TMP/q" --calib wiki
expect 2 "--calib must be self:N,LEN" -- quantize --model "$TINY" --out "$TMP/q" --calib self:4
expect 2 "--calib: need 1 <= N" -- quantize --model "$TINY" --out "$TMP/q" --calib self:0,64
expect 2 "no such text file" -- quantize --model "$TINY" --out "$TMP/q" --calib text:/no/such.txt
expect 2 "--train-steps must be an integer" -- quantize --model "$TINY" --out "$TMP/q" --train-steps x
expect 2 "--no-gate only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec static --no-gate
expect 2 "--mse-weight only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec static --mse-weight 1
expect 2 "--layer-mse-weight only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec none --layer-mse-weight 1
expect 2 "layer-mse-weight" -- quantize --model "$TINY" --out "$TMP/q" --layer-mse-weight -1
expect 2 "--kl-temperature only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec none --kl-temperature 2
expect 2 "--kl-temperature must be" -- quantize --model "$TINY" --out "$TMP/q" --kl-temperature 0
expect 2 "--gate-lr-scale only applies" -- quantize --model "$TINY" --out "$TMP/q" --no-gate --gate-lr-scale 1
expect 2 "--gate-lr-scale only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec static --gate-lr-scale 1
expect 2 "--gate-lr-scale must be" -- quantize --model "$TINY" --out "$TMP/q" --gate-lr-scale -1
expect 2 "--train-batch must be in \[1, 64\]" -- quantize --model "$TINY" --out "$TMP/q" --train-batch 0
expect 2 "--train-batch only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec static --train-batch 1
expect 2 "--calib-windows, --calib-top-p, --calib-temperature and --calib-random-start only apply" -- quantize --model "$TINY" --out "$TMP/q" --calib text:"$0" --calib-windows 2
expect 2 "--calib-windows, --calib-top-p, --calib-temperature and --calib-random-start only apply" -- quantize --model "$TINY" --out "$TMP/q" --calib text:"$0" --calib-random-start 0.5
expect 2 "--calib-temperature and --calib-random-start only apply" -- quantize --model "$TINY" --out "$TMP/q" --calib text:"$0" --calib-temperature 1.2
expect 2 "--calib-temperature must be" -- quantize --model "$TINY" --out "$TMP/q" --calib-temperature 0
expect 2 "--calib-random-start must be" -- quantize --model "$TINY" --out "$TMP/q" --calib-random-start 1.5
expect 2 "--ec-min-rank must be" -- quantize --model "$TINY" --out "$TMP/q" --ec-min-rank 0
expect 2 "--calib-top-p must be" -- quantize --model "$TINY" --out "$TMP/q" --calib-top-p 0
expect 2 "--calib-mix-text must be FILE,M" -- quantize --model "$TINY" --out "$TMP/q" --calib-mix-text "$0"
expect 2 "--calib-mix-text must be FILE,M" -- quantize --model "$TINY" --out "$TMP/q" --calib-mix-text "$0",0
expect 2 "--calib-mix-text: no such text file" -- quantize --model "$TINY" --out "$TMP/q" --calib-mix-text /no/such.txt,4
expect 2 "--calib-mix-text: no such text file" -- quantize --model "$TINY" --out "$TMP/q" --calib-mix-text "$0,4;/no/such.txt,4"
expect 2 "--calib-mix-text must be FILE,M" -- quantize --model "$TINY" --out "$TMP/q" --calib-mix-text "$0,4;"
expect 2 "--calib-mix-text only applies" -- quantize --model "$TINY" --out "$TMP/q" --calib text:"$0" --calib-mix-text "$0",4
expect 2 "--calib-prompts must be FILE\[,F\]" -- quantize --model "$TINY" --out "$TMP/q" --calib-prompts "$0",2
expect 2 "--calib-prompts: no such file" -- quantize --model "$TINY" --out "$TMP/q" --calib-prompts /no/such.txt
expect 2 "--calib-prompts only applies" -- quantize --model "$TINY" --out "$TMP/q" --calib text:"$0" --calib-prompts "$0"
expect 2 "--calib-chat only applies with --calib-prompts" -- quantize --model "$TINY" --out "$TMP/q" --calib-chat
expect 2 "--calib-prompts and --calib-random-start exclude" -- quantize --model "$TINY" --out "$TMP/q" --calib-prompts "$0",0.5 --calib-random-start 0.5
expect 2 "--diagnostic-seqs must be" -- quantize --model "$TINY" --out "$TMP/q" --diagnostic-seqs 0
expect 2 "--diagnostic-tokens / --diagnostic-seqs need" -- quantize --model "$TINY" --out "$TMP/q" --ec none --diagnostic-seqs 4
expect 2 "unknown flag --bogus" -- quantize --model "$TINY" --out "$TMP/q" --bogus
# --ec-latency-table (measured EC latency per module shape: ec_latency.h). The
# tiny model's shapes: 64x64 (q, o), 32x64 (k, v), 176x64 (gate, up), 64x176 (down).
printf '# tiny\nn,k,m,rank,w4_us,ec_us\n64,64,1,4,3,7\n32,64,1,4,3,6\n176,64,1,4,3,8\n' >"$TMP/lat_part.csv"
{ cat "$TMP/lat_part.csv"; echo "64,176,1,4,4,5"; } >"$TMP/lat.csv"
printf 'n,k,m,rank\n1,2,3,4\n' >"$TMP/lat_bad.csv"
expect 2 "--ec-latency-table only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec static-all --ec-latency-table "$TMP/lat.csv"
expect 2 "--ec-latency-table only applies" -- quantize --model "$TINY" --out "$TMP/q" --ec none --ec-latency-table "$TMP/lat.csv"
expect 2 "cannot read EC latency table" -- quantize --model "$TINY" --out "$TMP/q" --ec-latency-table "$TMP/no_such.csv"
expect 2 "lat_bad.csv:1: expected the header" -- quantize --model "$TINY" --out "$TMP/q" --ec-latency-table "$TMP/lat_bad.csv"
expect 1 "no row for n=64 k=176 m=1 rank=4" -- quantize --model "$TINY" --out "$TMP/qmiss" --ec-latency-table "$TMP/lat_part.csv"
[[ -e "$TMP/qmiss" ]] && { echo "FAIL: a refused quantize created --out"; fails=$((fails + 1)); }
{ echo "# W4 group 128 asymmetric"; cat "$TMP/lat.csv"; } >"$TMP/lat_g128.csv"
expect 1 "measured with W4 group 128, this quantize uses group -1" -- quantize --model "$TINY" --out "$TMP/qmiss" --ec-latency-table "$TMP/lat_g128.csv"
expect 1 "no such model" -- quantize --model /no/such/dir --out "$TMP/q"
mkdir -p "$TMP/full" && touch "$TMP/full/x"
expect 1 "not empty; use --force" -- quantize --model "$TINY" --out "$TMP/full"
[[ -e "$TMP/q" ]] && { echo "FAIL: a refused quantize created --out"; fails=$((fails + 1)); }

# A real quantize + load of the result, and the eval table's flag checks.
expect 0 "saved" -- quantize --model "$TINY" --out "$TMP/q" --calib self:2,16 --train-steps 5 --threads 2
[[ -f "$TMP/q/spear.json" && ! -e "$TMP/q.tmp" ]] || { echo "FAIL: no $TMP/q/spear.json"; fails=$((fails + 1)); }
expect 0 "prompt tokens" -- generate --model "$TMP/q" --prompt-ids "1 5 9" --max-tokens 4
# Log lines ("[info] loaded ... model") go to stderr, never into stdout, which callers parse.
"$SPEAR" generate --model "$TMP/q" --prompt-ids "1 5 9" --max-tokens 2 >"$TMP/gen.out" 2>"$TMP/gen.err"
if grep -q "\] \[info\]" "$TMP/gen.out" || ! grep -q "\] \[info\]" "$TMP/gen.err"; then
  echo "FAIL: log lines must be on stderr only"; fails=$((fails + 1))
else
  echo "ok: log lines on stderr"
fi
expect 0 "\.spear v1" -- info --model "$TMP/q"
expect 0 "lat\(m\)" -- quantize --model "$TINY" --out "$TMP/qlat" --calib self:2,16 --train-steps 5 --threads 2 --ec-latency-table "$TMP/lat.csv"
if grep -q 'ec_latency_table' "$TMP/qlat/spear.json" && grep -q "measured on the GPU" "$TMP/out"; then
  echo "ok: the measured latency table is used and recorded"
else
  echo "FAIL: --ec-latency-table not in the report or the provenance"; fails=$((fails + 1))
fi
# --ec-placement: qlat's modules and ranks, no diagnostic; recorded in the provenance
# (and --train-batch 1 in place of the default 2 sequences a step, --ec-lr 0.005
# in place of 3e-3).
expect 0 "EC placement given by" -- quantize --model "$TINY" --out "$TMP/qplace" --calib self:2,16 --seed 5 --train-steps 5 --threads 2 --ec-placement "$TMP/qlat" --train-batch 1 --ec-lr 0.005
if python3 - "$TMP/qlat/spear.json" "$TMP/qplace/spear.json" <<'PY'
import json, sys
ranks = lambda f: [(m["name"], (m["ec"] or {}).get("rank", 0)) for m in json.load(open(f))["modules"]]
a, b = ranks(sys.argv[1]), ranks(sys.argv[2])
prov = json.load(open(sys.argv[2]))["provenance"]
batch = lambda f: json.load(open(f))["provenance"]["quantize_options"]["ec_training"]["batch_sequences"]
ok = a == b and any(r for _, r in a) and "qlat" in json.dumps(prov)
ok = ok and batch(sys.argv[1]) == 2 and batch(sys.argv[2]) == 1
lr = lambda f: json.load(open(f))["provenance"]["quantize_options"]["ec_training"]["lr"]
ok = ok and lr(sys.argv[1]) == 0.003 and lr(sys.argv[2]) == 0.005
sys.exit(0 if ok else 1)
PY
then
  echo "ok: --ec-placement reproduces the source's ECs and records it; --train-batch and --ec-lr recorded"
else
  echo "FAIL: --ec-placement's ECs differ from the source's or are not recorded, or --train-batch / --ec-lr are not"; fails=$((fails + 1))
fi
# --ec-launch-budget: at most round(F L) of the GPU's GEMM launches carry an EC
# (q/k/v one launch, gate/up one, every other linear its own), recorded. (20 %
# of memory would buy an EC on each of the tiny model's 8 launches.)
expect 0 "carry an EC .launch budget: at most" -- quantize --model "$TINY" --out "$TMP/qlb" --calib self:2,16 --train-steps 2 --threads 2 --ec-breadth 4 --ec-min-rank 1 --ec-budget 20 --ec-launch-budget 0.25
if python3 - "$TMP/qlb/spear.json" "$TMP/out" <<'PY'
import json, re, sys
j = json.load(open(sys.argv[1]))
cap = int(re.search(r"launch budget: at most (\d+)", open(sys.argv[2]).read()).group(1))
launches, every = set(), set()
for m in j["modules"]:
    p = m["name"].split(".")
    fused = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
    every.add((p[2], fused.get(p[-1], p[-1])))
    if (m["ec"] or {}).get("rank", 0):
        launches.add((p[2], fused.get(p[-1], p[-1])))
ok = 0 < len(launches) <= cap < len(every) and j["provenance"]["quantize_options"]["ec_launch_budget"] == 0.25
sys.exit(0 if ok else 1)
PY
then
  echo "ok: --ec-launch-budget keeps the EC-carrying launches within its cap and is recorded"
else
  echo "FAIL: --ec-launch-budget exceeded or not recorded"; fails=$((fails + 1))
fi
expect 2 "--ec-launch-budget must be in \(0, 1\], got 0" -- quantize --model "$TINY" --out "$TMP/q3" --ec-launch-budget 0
expect 2 "--ec-launch-budget must be in \(0, 1\], got 1.5" -- quantize --model "$TINY" --out "$TMP/q3" --ec-launch-budget 1.5
expect 2 "--ec-launch-budget must be a number, got 'half'" -- quantize --model "$TINY" --out "$TMP/q3" --ec-launch-budget half
expect 2 "--ec-launch-budget has no effect with --ec-placement" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement "$TMP/qlat" --ec-launch-budget 0.5
expect 2 "--ec-breadth has no effect with --ec-placement" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement "$TMP/qlat" --ec-breadth 2
expect 2 "--diagnostic-tokens has no effect with --ec-placement" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement "$TMP/qlat" --diagnostic-tokens 64
expect 2 "--ec-min-rank has no effect with --ec static-all .every module at the rank the budget buys" -- quantize --model "$TINY" --out "$TMP/q3" --ec static-all --ec-min-rank 2
expect 2 "--ec-lr only applies to --ec spear" -- quantize --model "$TINY" --out "$TMP/q3" --ec static --ec-lr 0.005
expect 2 "--ec-breadth has no effect with --ec none" -- quantize --model "$TINY" --out "$TMP/q3" --ec none --ec-breadth 2
expect 2 "--ec-placement only applies to --ec spear or static" -- quantize --model "$TINY" --out "$TMP/q3" --ec static-all --ec-placement "$TMP/qlat"
expect 2 "--ec-placement: '/no/such' is not a .spear checkpoint" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement /no/such
expect 1 "over the budget" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement "$TMP/qlat" --ec-budget 0.01
[[ -e "$TMP/q3" ]] && { echo "FAIL: a refused quantize created --out"; fails=$((fails + 1)); }
expect 1 "not empty; use --force" -- quantize --model "$TINY" --out "$TMP/q"
expect 0 "saved" -- quantize --model "$TINY" --out "$TMP/q" --ec none --calib self:2,16 --force
expect 2 "has no EC" -- quantize --model "$TINY" --out "$TMP/q3" --ec-placement "$TMP/q"
expect 1 "already quantized" -- quantize --model "$TMP/q" --out "$TMP/q2"
sed 's/"format_version": 1/"format_version": 7/' "$TMP/q/spear.json" >"$TMP/v" && mkdir -p "$TMP/qbad" && cp "$TMP/q/model.safetensors" "$TMP/qbad/" && mv "$TMP/v" "$TMP/qbad/spear.json"
expect 1 "format_version 7" -- generate --model "$TMP/qbad" --prompt-ids "1 2"
expect 2 "not both" -- eval --model a --models a,b --text x
expect 2 "at least two" -- eval --models a --text x
expect 2 "--labels has 1 entries" -- eval --models a,b --labels X --text x
expect 2 "must name a label" -- eval --models a,b --reference-w4 c --text x
expect 2 "needs --models" -- eval --model a --labels X --text x
expect 1 "no tokenizer" -- eval --models "$TINY","$TMP/q" --text "$TINY/config.json"

echo "$fails failure(s)"
[[ $fails -eq 0 ]]
