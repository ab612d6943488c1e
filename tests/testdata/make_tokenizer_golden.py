#!/usr/bin/env python3
"""Golden token ids for the C++ tokenizer tests, produced with HF `tokenizers`.

Outputs (tests/testdata unless --out):
  tokenizer_golden.json       {strings, ids}: SmolLM2-135M tokenizer rebuilt
                              from the GGUF (the real tokenizer.json layout:
                              Sequence[Digits(individual), ByteLevel], BPE,
                              ByteLevel decoder, token_type==3 as special).
  tiny_bpe_llama3.json        small BPE trained here: Split(llama3 regex) +
                              ByteLevel(use_regex=false), TemplateProcessing
                              BOS, ignore_merges, merges as [a, b] pairs.
  tiny_bpe_gpt2.json          small BPE: Sequence[Digits(contiguous),
                              ByteLevel(add_prefix_space)], an lstrip/rstrip
                              added token, merges as "a b" strings.
  tokenizer_tiny_golden.json  {strings, cases: [{tokenizer, add_special, ids}]}
The full SmolLM2 tokenizer.json (~2 MB) is written to --big-json (default
/tmp/smollm2_tokenizer.json), not into the repository.

Usage: pip install tokenizers gguf numpy
       python3 tests/testdata/make_tokenizer_golden.py [--gguf PATH]
"""
import argparse
import json
import os

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, Regex
from tokenizers import AddedToken

STRINGS = [
    "",
    "Hello world",
    "Hello, world! How are you?",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple    spaces   between words",
    "tabs\tand\t\ttabs",
    "new\nlines\n\nand\r\nCRLF",
    "\n\n\n",
    "   \t \n  ",
    "It's a dog's life, isn't it? We'll see, they'd say, I'm sure you've heard.",
    "IT'S LOUD, WE'LL SHOUT",
    "3.14159265358979323846",
    "1234567890123456789012345678901234567890",
    "Call 555-0123 or +1 (800) 555 0199.",
    "Year 2024, 1st place, 2nd try, 100%",
    "½ ² ³ ٣ ४ 七",
    "café naïve résumé coöperate Zürich",
    "Ünïcödé àccénts éèêë",
    "e\u0301 (combining acute) vs \u00e9",
    "中文分词测试：你好，世界！",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα αβγ",
    "עברית מימין לשמאל",
    "हिन्दी पाठ",
    "ไทย ภาษา",
    "emoji 😀😃😄 party 🎉",
    "family 👨‍👩‍👧‍👦 and flag 🇺🇸 and skin 👍🏽",
    "heart ❤️ variation selector",
    "def foo(x):\n    return x * 2\n",
    "class A {\n  public:\n    int b;\n};",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "    deeply\n        indented\n            code",
    "if x == 1 and y != 2: print(f\"{x!r}\")",
    "<html><body><p>Hi</p></body></html>",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text before<|im_end|>text after",
    "<|endoftext|><|endoftext|>",
    "partial <|im_start and <|im_end| not special",
    "<repo_name>spear<file_sep>main.cc",
    "special inside word: abc<|im_start|>def",
    "!!!???...,,,;;;",
    "#!/bin/bash\necho $HOME && ls -la | grep foo",
    "a",
    " ",
    "\t",
    "ZWJ alone \u200d here",
    "non-breaking\u00a0space and thin\u2009space",
    "mixed 中文 and English 123 ok",
    "snake_case_identifier camelCaseIdentifier PascalCase",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "$100,000.00 €50 £20 ¥1000",
    "math: ∑ ∫ √ ∞ ≠ ≤ ≥ → ⇒",
    "quotes “curly” ‘single’ «guillemets»",
    "ellipsis… em—dash en–dash",
    "x" * 300,
    "1" * 50 + " " + "9" * 20,
    "'s 't 're 've 'm 'll 'd",
    "don't won't can't shouldn't",
    "control\x06chars\x04and DEL\x7f and bell\x07",
]

TRAIN_TEXT = "\n".join(STRINGS) + """
The tokenizer library turns text into token ids and back again. Byte-level BPE
maps every byte to a printable character, so any input can be encoded.
Numbers like 42, 1000 and 3.14 appear in text; so do words such as the, and,
of, to, in, is, it, that, for, on, with, as, was, at, by, this, from.
def encode(text):
    return [vocab[t] for t in split(text)]
Chat: <|im_start|>system You are helpful.<|im_end|> Ünïcödé 中文 emoji 😀.
"""


def build_smollm2_json(gguf_path):
    r = gguf.GGUFReader(gguf_path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = strings("tokenizer.ggml.merges")
    tt = r.fields["tokenizer.ggml.token_type"]
    types = [int(tt.parts[i][0]) for i in tt.data]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, t in enumerate(types) if t == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def train_tiny(pre, post, specials, vocab_size, ignore_merges):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT] * 3, trainer)
    if post is not None:
        tok.post_processor = post(tok)
    return tok


QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_gguf_presets(base, out_dir, strings):
    """tiny_<pre>.gguf files holding only tokenizer metadata, plus golden ids."""
    j = json.loads(base.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["id"] for a in j["added_tokens"] if a["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    bos = vocab["<|begin_of_text|>"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False,
                  "trim_offsets": True}
    presets = {
        "gpt2": ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True,
                  "trim_offsets": True}, False),
        "smollm": ({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True,
             "trim_offsets": True}]}, False),
        "llama-bpe": ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": False}, byte_level]}, True),
        "qwen2": ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated",
             "invert": False}, byte_level]}, False),
    }
    cases = []
    for pre, (pre_json, llama3) in presets.items():
        name = "tiny_%s.gguf" % pre
        w = gguf.GGUFWriter(os.path.join(out_dir, name), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
        w.add_token_merges(merges)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(vocab["<|end_of_text|>"])
        w.add_add_bos_token(llama3)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        hf = dict(j)
        hf["pre_tokenizer"] = pre_json
        hf["model"] = dict(j["model"], ignore_merges=llama3)
        hf["post_processor"] = j["post_processor"] if llama3 else None
        t = Tokenizer.from_str(json.dumps(hf))
        cases.append({"gguf": name, "ids": [t.encode(x, add_special_tokens=True).ids
                                            for x in strings]})
    return cases


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser(
        "~/.cache/spear/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=here)
    ap.add_argument("--big-json", default="/tmp/smollm2_tokenizer.json")
    args = ap.parse_args()

    # 1. SmolLM2 from the GGUF.
    big = build_smollm2_json(args.gguf)
    with open(args.big_json, "w", encoding="utf-8") as f:
        json.dump(big, f, ensure_ascii=False)
    tok = Tokenizer.from_file(args.big_json)
    ids = [tok.encode(s, add_special_tokens=False).ids for s in STRINGS]
    # HF's decode; equal to the input except where bytes lack a byte token
    # (SmolLM2 has none for some control characters: they are dropped).
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    lossy = [s for s, d in zip(STRINGS, decoded) if s != d]
    assert len(lossy) == 1 and "\x06" in lossy[0], lossy
    with open(os.path.join(args.out, "tokenizer_golden.json"), "w", encoding="utf-8") as f:
        json.dump({"source": os.path.basename(args.gguf), "strings": STRINGS, "ids": ids,
                   "decoded": decoded}, f, ensure_ascii=False, indent=0)

    # 2. Small committed fixtures exercising the tokenizer.json loader.
    llama3_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                    r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tiny_llama3 = train_tiny(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        lambda t: processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[
                ("<|begin_of_text|>", t.token_to_id("<|begin_of_text|>"))]),
        ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"], 600, True)
    tiny_gpt2 = train_tiny(
        pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)]),
        None, ["<|endoftext|>"], 500, False)
    tiny_gpt2.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=False)])
    tiny_gpt2.add_special_tokens(["<|im_start|>", "<|im_end|>"])

    cases = []
    for name, t in [("tiny_bpe_llama3.json", tiny_llama3), ("tiny_bpe_gpt2.json", tiny_gpt2)]:
        path = os.path.join(args.out, name)
        t.save(path)
        if name == "tiny_bpe_gpt2.json":  # exercise the "a b" merge spelling too
            with open(path, encoding="utf-8") as f:
                j = json.load(f)
            j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                                    for m in j["model"]["merges"]]
            with open(path, "w", encoding="utf-8") as f:
                json.dump(j, f, ensure_ascii=False, indent=1)
            t = Tokenizer.from_file(path)
        strings = STRINGS + ["a <mask> b", "x<mask>y", "  <mask>  z"]
        for add_special in (False, True):
            cases.append({"tokenizer": name, "add_special": add_special,
                          "ids": [t.encode(s, add_special_tokens=add_special).ids
                                  for s in strings]})
    # 3. GGUF presets (tokenizer.ggml.pre) on the tiny llama3 vocabulary, each
    # against HF with the equivalent pre-tokenizer.
    gguf_cases = write_gguf_presets(tiny_llama3, args.out, STRINGS)
    with open(os.path.join(args.out, "tokenizer_tiny_golden.json"), "w", encoding="utf-8") as f:
        json.dump({"strings": STRINGS + ["a <mask> b", "x<mask>y", "  <mask>  z"],
                   "cases": cases, "gguf_strings": STRINGS, "gguf_cases": gguf_cases}, f,
                  ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main()
