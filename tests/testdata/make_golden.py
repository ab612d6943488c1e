#!/usr/bin/env python3
"""Builds the golden-parity fixtures for the LLaMA forward pass.

Run once on a machine with torch + transformers (the GPU machine has both;
the CPU is used, in float32, so results do not depend on GPU kernels):

    python3 tests/testdata/make_golden.py --out tests/testdata/golden

For each variant it writes <out>/<variant>/{config.json, model.safetensors}
(via save_pretrained) and golden.safetensors holding, for prompt i,
`input_ids_i` (int32 [len]) and `logits_i` (float32 [len, vocab]), with
metadata num_prompts, the transformers and torch versions.

Variants (2 layers, d=64, 4 heads, 2 kv heads = GQA, vocab 256):
  tiny_llama_untied  separate lm_head, plain RoPE (theta 1e4)
  tiny_llama_tied    tied embeddings, llama3 RoPE scaling (theta 5e5)
Weights are drawn with a larger std than HF's default and the RMSNorm
weights are perturbed away from 1 so that every parameter matters.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT_LENGTHS = [1, 7, 33, 100]


def build(variant: str, seed: int) -> LlamaForCausalLM:
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.08, attn_implementation="eager")
    if variant == "tiny_llama_untied":
        cfg = LlamaConfig(tie_word_embeddings=False, rope_theta=10000.0, **common)
    else:
        cfg = LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32},
                          **common)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "golden"))
    args = ap.parse_args()
    for i, variant in enumerate(["tiny_llama_untied", "tiny_llama_tied"]):
        model = build(variant, seed=1234 + i)
        d = os.path.join(args.out, variant)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        gen = torch.Generator().manual_seed(99 + i)
        tensors = {}
        for j, n in enumerate(PROMPT_LENGTHS):
            ids = torch.randint(0, 256, (1, n), generator=gen)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float().contiguous()
            tensors[f"input_ids_{j}"] = ids[0].to(torch.int32).contiguous()
            tensors[f"logits_{j}"] = logits
        meta = {"num_prompts": str(len(PROMPT_LENGTHS)),
                "transformers": transformers.__version__, "torch": torch.__version__}
        save_file(tensors, os.path.join(d, "golden.safetensors"), metadata=meta)
        with open(os.path.join(d, "config.json")) as f:
            print(variant, json.dumps(json.load(f)))
        print(variant, "logits[0][0,:4] =", tensors["logits_0"][0, :4].tolist())


if __name__ == "__main__":
    main()
