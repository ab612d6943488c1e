#!/usr/bin/env python3
"""Writes small valid seed inputs for the fuzz targets (no dependencies).

Usage: make_seeds.py CORPUS_DIR  ->  CORPUS_DIR/fuzz_safetensors/*, CORPUS_DIR/fuzz_gguf/*,
CORPUS_DIR/fuzz_spear_manifest/*, CORPUS_DIR/fuzz_spear_checkpoint/*
"""
import json
import os
import struct
import sys


def safetensors(tensors, metadata=None):
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, payload in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype, v):
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
    if vtype == 8:
        return gguf_string(v)
    if vtype == 9:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, x) for x in items)
    return struct.pack(fmt[vtype], v)


def gguf(kvs, tensors, version=3, alignment=32):
    out = struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(kvs))
    for key, vtype, v in kvs:
        out += gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, v)
    offset, blobs = 0, []
    for name, ggml_type, dims, payload in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        padded = payload + b"\0" * ((alignment - len(payload) % alignment) % alignment)
        blobs.append(padded)
        offset += len(padded)
    out += b"\0" * ((alignment - len(out) % alignment) % alignment)
    return out + b"".join(blobs)


def pattern(n, seed=7):
    return bytes((seed * 31 + i * 17) & 0xFF for i in range(n))


# The one-layer .spear manifest both .spear targets start from (hidden 16,
# intermediate 32, 2 heads and 1 KV head of 8: its shard fits fuzz.sh's
# -max_len=8192); fuzz_spear_checkpoint reads the same file at run time.
SEED_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spear_seed_manifest.json")


def spear_manifests():
    """The seed manifest and three variants of it: no ECs; gated int8 ECs on
    every module with groups of 8; static fp16 ECs of rank 4."""
    with open(SEED_MANIFEST) as f:
        base = json.load(f)

    def variant(ec, factors=None, group=None):
        m = json.loads(json.dumps(base))
        m["tokenizer"] = "tokenizer.json"
        for mod in m["modules"]:
            mod["ec"] = dict(ec, **({"factors": factors} if factors else {})) if ec else None
            if group:
                mod["quantization"]["group_size"] = group
        return json.dumps(m)

    return {"seed.json": json.dumps(base), "plain.json": variant(None),
            "gated_i8.json": variant({"rank": 2, "gate_hidden": 16, "gated": True}, "i8", 8),
            "static_f16.json": variant({"rank": 4, "gate_hidden": 0, "gated": False}, "f16")}


def spear_checkpoint_seed():
    """model.safetensors that loads beside the seed manifest: W4 with the
    manifest's groups, its gated fp16 ECs, tied embeddings."""
    with open(SEED_MANIFEST) as f:
        man = json.load(f)
    arch = man["architecture"]
    v, d = arch["vocab_size"], arch["hidden_size"]
    one, tenth = struct.pack("<e", 1.0), struct.pack("<e", 0.1)
    t = [("model.embed_tokens.weight", "F16", [v, d], tenth * (v * d)),
         ("model.norm.weight", "F16", [d], one * d),
         ("model.layers.0.input_layernorm.weight", "F16", [d], one * d),
         ("model.layers.0.post_attention_layernorm.weight", "F16", [d], one * d)]
    for i, mod in enumerate(man["modules"]):
        p, (n, k) = mod["name"], mod["shape"]
        g = -(-k // mod["quantization"]["group_size"])
        t += [(p + ".qweight", "U8", [n, (k + 1) // 2], pattern(n * ((k + 1) // 2), i)),
              (p + ".scales", "F16", [n, g], tenth * (n * g)),
              (p + ".zeros", "U8", [n, g], bytes([8]) * (n * g))]
        ec = mod["ec"]
        if ec:
            r, h = ec["rank"], ec["gate_hidden"]
            t += [(p + ".ec.a", "F16", [r, k], tenth * (r * k)), (p + ".ec.b", "F16", [n, r], tenth * (n * r)),
                  (p + ".ec.w1", "F16", [h, r], tenth * (h * r)), (p + ".ec.b1", "F16", [h], tenth * h),
                  (p + ".ec.w2", "F16", [r, h], tenth * (r * h)), (p + ".ec.b2", "F16", [r], tenth * r)]
    return safetensors(t)


def main():
    root = sys.argv[1]
    st_dir, gg_dir = os.path.join(root, "fuzz_safetensors"), os.path.join(root, "fuzz_gguf")
    os.makedirs(st_dir, exist_ok=True)
    os.makedirs(gg_dir, exist_ok=True)

    seeds = {
        "all_dtypes": safetensors([
            ("f32", "F32", [2, 3], pattern(24)), ("f16", "F16", [4], pattern(8)),
            ("bf16", "BF16", [2], pattern(4)), ("f64", "F64", [1], pattern(8)),
            ("i8", "I8", [3], pattern(3)), ("i16", "I16", [2], pattern(4)),
            ("i32", "I32", [1, 1], pattern(4)), ("i64", "I64", [1], pattern(8)),
            ("u8", "U8", [2], pattern(2)), ("bool", "BOOL", [2], b"\x00\x01"),
            ("scalar", "F32", [], pattern(4)), ("empty", "F32", [0, 3], b""),
        ], {"format": "pt"}),
        "one": safetensors([("model.embed_tokens.weight", "BF16", [4, 2], pattern(16))]),
        "empty": safetensors([]),
        "config_llama3.json": json.dumps({
            "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 500000.0, "eos_token_id": [1, 2], "bos_token_id": 0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}).encode(),
        "config_qwen2_yarn.json": json.dumps({
            "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16,
            "rope_scaling": {"type": "yarn", "factor": 4.0}, "tie_word_embeddings": True}).encode(),
    }
    for name, blob in seeds.items():
        with open(os.path.join(st_dir, name), "wb") as f:
            f.write(blob)

    llama_kvs = [
        ("general.architecture", 8, "llama"), ("general.alignment", 4, 32),
        ("llama.block_count", 4, 1), ("llama.embedding_length", 4, 32),
        ("llama.feed_forward_length", 4, 64), ("llama.attention.head_count", 4, 2),
        ("llama.attention.head_count_kv", 4, 1), ("llama.rope.freq_base", 6, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5), ("llama.context_length", 4, 256),
        ("llama.rope.dimension_count", 4, 16), ("llama.rope.scaling.type", 8, "linear"),
        ("llama.rope.scaling.factor", 6, 2.0),
        ("tokenizer.ggml.tokens", 9, (8, ["<s>", "</s>", "a", "b"])),
        ("tokenizer.ggml.token_type", 9, (5, [3, 3, 1, 1])),
        ("tokenizer.ggml.scores", 9, (6, [0.0, 0.0, -1.0, -2.0])),
        ("tokenizer.ggml.bos_token_id", 4, 0), ("tokenizer.ggml.eos_token_id", 4, 1),
        ("tokenizer.ggml.add_bos_token", 7, 1),
        ("test.nested", 9, (9, [(0, [1, 2]), (11, [-1])])),
        ("test.scalars", 9, (12, [0.5, -2.0])), ("test.i8", 1, -3), ("test.u16", 2, 9),
        ("test.i16", 3, -9), ("test.u64", 10, 1 << 40), ("test.i64", 11, -(1 << 40)),
    ]
    # ggml types: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 12 Q4_K, 14 Q6_K, 30 BF16
    fp16_one = b"\x00\x3c"
    tensors = [
        ("token_embd.weight", 8, [32, 4], b"".join(fp16_one + pattern(32, i) for i in range(4))),
        ("blk.0.attn_norm.weight", 0, [32], struct.pack("<32f", *range(32))),
        ("blk.0.attn_q.weight", 2, [32, 1], fp16_one + pattern(16)),
        ("blk.0.attn_k.weight", 3, [32, 1], fp16_one + b"\x00\xbc" + pattern(16)),
        ("blk.0.attn_v.weight", 6, [32], fp16_one + pattern(20)),
        ("blk.0.attn_output.weight", 7, [32], fp16_one * 2 + pattern(20)),
        ("blk.0.ffn_gate.weight", 12, [256], fp16_one * 2 + pattern(140)),
        ("blk.0.ffn_up.weight", 14, [256], pattern(208) + fp16_one),
        ("blk.0.ffn_down.weight", 1, [4, 2], fp16_one * 8),
        ("output_norm.weight", 30, [4], b"\x80\x3f" * 4),
    ]
    ggufs = {
        "llama_v3.gguf": gguf(llama_kvs, tensors),
        "llama_v2_align64.gguf": gguf(llama_kvs[:1] + [("general.alignment", 4, 64)] + llama_kvs[2:],
                                      tensors[:3], version=2, alignment=64),
        "metadata_only.gguf": gguf(llama_kvs, []),
        "empty.gguf": gguf([], []),
    }
    for name, blob in ggufs.items():
        with open(os.path.join(gg_dir, name), "wb") as f:
            f.write(blob)
    man_dir = os.path.join(root, "fuzz_spear_manifest")
    os.makedirs(man_dir, exist_ok=True)
    manifests = spear_manifests()
    for name, text in manifests.items():
        with open(os.path.join(man_dir, name), "w") as f:
            f.write(text)
    ck_dir = os.path.join(root, "fuzz_spear_checkpoint")
    os.makedirs(ck_dir, exist_ok=True)
    with open(os.path.join(ck_dir, "one_layer.safetensors"), "wb") as f:
        f.write(spear_checkpoint_seed())
    print(f"seeds: {len(seeds)} safetensors/config, {len(ggufs)} gguf, "
          f"{len(manifests)} spear.json, 1 .spear shard in {root}")


if __name__ == "__main__":
    main()
