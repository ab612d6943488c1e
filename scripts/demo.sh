#!/usr/bin/env bash
# The README's main job: install, build, fetch SmolLM2-135M-Instruct, measure
# its perplexity on a WikiText-2 slice and answer instruct prompts, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
BUILD=${SPEAR_BUILD_DIR:-build}
SPEAR="$BUILD/cli/spear"
MODEL=$("$SPEAR" pull smollm2-135m)
echo "== model: $MODEL"
TEXT=../shared/data/wikitext-2-raw/wiki.test.raw
if [[ -f "$TEXT" ]]; then
  echo "== perplexity (WikiText-2 test, first 16k tokens, ctx 512)"
  "$SPEAR" eval --model smollm2-135m --text "$TEXT" --ctx 512 --max-tokens 16384
fi
for p in "Give me three tips for staying healthy." \
         "What is the capital of France? Answer in one sentence." \
         "Write a haiku about the sea."; do
  echo "== prompt: $p"
  "$SPEAR" generate --model smollm2-135m --chat --prompt "$p" --max-tokens 96
  echo
done
