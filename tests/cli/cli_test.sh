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

echo "$fails failure(s)"
[[ $fails -eq 0 ]]
