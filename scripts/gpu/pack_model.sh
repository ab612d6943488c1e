#!/usr/bin/env bash
# Packs a .spear model directory for the GPU machine, whose device tool
# carries at most 64 MiB per call (working tree included): model.safetensors
# compressed (zstd -19 --long) and cut into PARTS pieces, one git-ignored
# folder per piece (DEST-1, DEST-2, ...; DEST must start with .bundle). The
# small files (spear.json, tokenizer) and a zstd binary with its libraries
# (the GPU machine may have none) go into the first folder. Carry the
# folders in consecutive `run` calls while the machine stays warm; each
# call's command first moves what it carried into .bundle-store/ (see
# scripts/gpu/run_model.sh: SPEAR_MODEL_STASH=1), the last call unpacks.
# usage: [SPEAR_ZSTD_LEVEL=-19] scripts/gpu/pack_model.sh SRC.spear DEST PARTS
# (SPEAR_ZSTD_LEVEL=-1 .. -19; -3 packed run S's SmolLM2 checkpoint into 98 MB in seconds)
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$1 dest=$2 parts=$3
case "$dest" in .bundle*) ;; *) echo "pack_model: DEST must start with .bundle" >&2; exit 2 ;; esac
level=${SPEAR_ZSTD_LEVEL:--19}
[[ "$level" =~ ^-([1-9]|1[0-9])$ ]] || { echo "pack_model: SPEAR_ZSTD_LEVEL must be -1 .. -19, got '$level'" >&2; exit 2; }
[[ -f "$src/spear.json" && -f "$src/model.safetensors" ]] || { echo "pack_model: $src is not a .spear" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
nice -n 10 zstd "$level" --long=27 -T1 -q -o "$tmp/model.safetensors.zst" "$src/model.safetensors"
(cd "$tmp" && split -n "$parts" -d -a 2 model.safetensors.zst model.safetensors.zst.part)
for i in $(seq 1 "$parts"); do rm -rf "$dest-$i"; mkdir -p "$dest-$i"; done
i=1
for f in "$tmp"/model.safetensors.zst.part*; do mv "$f" "$dest-$i/"; i=$((i + 1)); done
first="$dest-1"
mkdir -p "$first/model" "$first/bin" "$first/lib"
for f in "$src"/*; do
  [[ "$(basename "$f")" == model.safetensors ]] || cp "$f" "$first/model/"
done
(cd "$src" && sha256sum model.safetensors) > "$first/model/model.safetensors.sha256"
cp "$(command -v zstd)" "$first/bin/"
ldd "$(command -v zstd)" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*)\.so' \
  | xargs -r -I{} cp -Ln {} "$first/lib/"
du -sh "$dest"-*
