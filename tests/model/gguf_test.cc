#include "worker/model/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>

#include "tests/model/gguf_builder.h"
#include "tests/test_util.h"

namespace spear::model {
namespace {

using ::spear::testing::AsBytes;
using ::spear::testing::GgufBuilder;
using ::spear::testing::Poke;
namespace t = ::spear::testing;

// A small valid file: metadata of several types and three tensors.
GgufBuilder SmallBuilder() {
  GgufBuilder b;
  b.AddString("general.architecture", "llama");
  b.AddU32("llama.block_count", 2);
  b.AddF32("llama.rope.freq_base", 10000.0f);
  b.AddBool("tokenizer.ggml.add_bos_token", true);
  b.Add<int64_t>("test.i64", t::kGI64, -5);
  b.Add<uint64_t>("test.u64", t::kGU64, 1ull << 40);
  b.Add<double>("test.f64", t::kGF64, 0.25);
  b.Add<int8_t>("test.i8", t::kGI8, -3);
  b.AddStringArray("tokenizer.ggml.tokens", {"<s>", "</s>", "a"});
  b.AddI32Array("tokenizer.ggml.token_type", {3, 3, 1});
  std::vector<float> w(2 * 3);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i);
  b.AddTensor("w", t::kGgmlF32, {3, 2}, AsBytes(w));  // shape {2, 3}
  b.AddTensor("q", t::kGgmlQ8_0, {32}, std::vector<uint8_t>(34, 1));
  b.AddTensor("norm", t::kGgmlF32, {4}, AsBytes(std::vector<float>{1, 2, 3, 4}));
  return b;
}

absl::StatusOr<std::unique_ptr<GgufFile>> Parse(const std::vector<uint8_t>& bytes) {
  return GgufFile::FromBuffer(bytes.data(), bytes.size(), "test.gguf");
}

void ExpectInvalid(const std::vector<uint8_t>& bytes, const std::string& substr) {
  absl::StatusOr<std::unique_ptr<GgufFile>> f = Parse(bytes);
  ASSERT_FALSE(f.ok()) << "expected failure containing: " << substr;
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
  EXPECT_NE(f.status().message().find(substr), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find("test.gguf"), std::string::npos) << f.status();
}

TEST(GgufTest, ParsesSyntheticFile) {
  const std::vector<uint8_t> bytes = SmallBuilder().Build();
  absl::StatusOr<std::unique_ptr<GgufFile>> f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("llama.block_count"), 2);
  EXPECT_EQ(*g.GetFloat("llama.rope.freq_base"), 10000.0);
  EXPECT_EQ(*g.GetFloat("llama.block_count"), 2.0);  // ints accepted as floats
  EXPECT_TRUE(*g.GetBool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ(*g.GetInt("test.i64"), -5);
  EXPECT_EQ(*g.GetInt("test.u64"), int64_t{1} << 40);
  EXPECT_EQ(*g.GetInt("test.i8"), -3);
  EXPECT_EQ(*g.GetFloat("test.f64"), 0.25);
  EXPECT_EQ(*g.GetStringArray("tokenizer.ggml.tokens"),
            (std::vector<std::string>{"<s>", "</s>", "a"}));
  EXPECT_EQ(*g.GetIntArray("tokenizer.ggml.token_type"), (std::vector<int64_t>{3, 3, 1}));
  EXPECT_EQ(g.GetString("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(g.GetString("llama.block_count").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetInt("general.architecture").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(g.GetStringArray("tokenizer.ggml.token_type").ok());

  ASSERT_EQ(g.tensors().size(), 3u);
  const TensorInfo* w = g.Find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->shape, (std::vector<int64_t>{2, 3}));  // reversed to outermost-first
  EXPECT_EQ(w->nbytes, 24u);
  std::vector<float> out(6);
  ASSERT_TRUE(Dequantize(*w, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(g.Find("q")->type, TensorType::kQ8_0);
  EXPECT_EQ(g.Find("q")->nbytes, 34u);
  EXPECT_EQ(g.Find("nope"), nullptr);
}

TEST(GgufTest, NestedArraysAndVersion2AndAlignment) {
  GgufBuilder b = SmallBuilder();
  b.version = 2;
  b.alignment = 64;
  b.AddU32("general.alignment", 64);
  // [[1, 2], [3]] as an array of arrays of u8.
  t::ByteWriter w;
  w.Put<uint32_t>(t::kGArray);
  w.Put<uint64_t>(2);
  w.Put<uint32_t>(t::kGU8);
  w.Put<uint64_t>(2);
  w.Put<uint8_t>(1);
  w.Put<uint8_t>(2);
  w.Put<uint32_t>(t::kGU8);
  w.Put<uint64_t>(1);
  w.Put<uint8_t>(3);
  b.AddRaw("test.nested", t::kGArray, w.bytes());
  const std::vector<uint8_t> bytes = b.Build();
  absl::StatusOr<std::unique_ptr<GgufFile>> f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 2u);
  EXPECT_EQ((*f)->alignment(), 64u);
  const GgufValue* v = (*f)->Get("test.nested");
  ASSERT_NE(v, nullptr);
  const GgufArray& outer = std::get<GgufArray>(v->v);
  ASSERT_EQ(outer.size(), 2u);
  EXPECT_EQ(std::get<GgufArray>(outer[0].v).size(), 2u);
  EXPECT_EQ(std::get<uint64_t>(std::get<GgufArray>(outer[1].v)[0].v), 3u);
  for (const TensorInfo& ti : (*f)->tensors()) {
    EXPECT_EQ((ti.data - bytes.data()) % 64, 0) << ti.name;
  }
}

TEST(GgufTest, EveryTruncationIsAnError) {
  const std::vector<uint8_t> bytes = SmallBuilder().Build();
  for (size_t n = 0; n < bytes.size(); ++n) {
    // Bytes after the last tensor's data are padding and may be cut.
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + n);
    absl::StatusOr<std::unique_ptr<GgufFile>> f = Parse(cut);
    if (f.ok()) {
      EXPECT_GE(n, bytes.size() - 32) << "prefix of " << n << " bytes parsed";
    } else {
      EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
    }
  }
  ExpectInvalid(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 20), "truncated");
}

TEST(GgufTest, CorruptHeaders) {
  GgufBuilder::Layout l;
  const std::vector<uint8_t> good = SmallBuilder().Build(&l);
  {
    std::vector<uint8_t> b = good;
    b[0] = 'X';
    ExpectInvalid(b, "bad magic");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint32_t>(&b, 4, 1);
    ExpectInvalid(b, "version 1 is not supported");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint32_t>(&b, 4, 0x03000000);  // 3, big-endian
    ExpectInvalid(b, "big-endian");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint32_t>(&b, 4, 7);
    ExpectInvalid(b, "unsupported GGUF version 7");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.tensor_count, uint64_t{1} << 60);
    ExpectInvalid(b, "tensor count");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.kv_count, ~uint64_t{0});
    ExpectInvalid(b, "metadata count");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.first_key_len, uint64_t{1} << 62);
    ExpectInvalid(b, "metadata key length");
  }
}

TEST(GgufTest, CorruptMetadata) {
  {
    GgufBuilder b;
    b.AddRaw("k", 99, {0, 0, 0, 0});
    ExpectInvalid(b.Build(), "unknown metadata value type 99");
  }
  {
    GgufBuilder b;  // huge string value length
    t::ByteWriter w;
    w.Put<uint64_t>(uint64_t{1} << 50);
    b.AddRaw("k", t::kGString, w.bytes());
    ExpectInvalid(b.Build(), "string value length");
  }
  {
    GgufBuilder b;  // array claiming 2^40 u32 elements
    t::ByteWriter w;
    w.Put<uint32_t>(t::kGU32);
    w.Put<uint64_t>(uint64_t{1} << 40);
    b.AddRaw("k", t::kGArray, w.bytes());
    ExpectInvalid(b.Build(), "array length");
  }
  {
    GgufBuilder b;  // 2^23 + 1 one-byte elements: fits the file, over the value cap
    t::ByteWriter w;
    w.Put<uint32_t>(t::kGU8);
    w.Put<uint64_t>((uint64_t{1} << 23) + 1);
    w.bytes().resize(w.size() + (size_t{1} << 23) + 1);
    b.AddRaw("k", t::kGArray, w.bytes());
    ExpectInvalid(b.Build(), "metadata values per file");
  }
  {
    GgufBuilder b;  // arrays nested 20 deep
    t::ByteWriter w;
    for (int i = 0; i < 20; ++i) {
      w.Put<uint32_t>(t::kGArray);
      w.Put<uint64_t>(1);
    }
    w.Put<uint32_t>(t::kGU8);
    w.Put<uint64_t>(0);
    b.AddRaw("k", t::kGArray, w.bytes());
    ExpectInvalid(b.Build(), "nested deeper");
  }
  {
    GgufBuilder b;
    b.AddU32("k", 1);
    b.AddU32("k", 2);
    ExpectInvalid(b.Build(), "duplicate metadata key");
  }
  {
    GgufBuilder b;
    b.AddU32("general.alignment", 24);
    ExpectInvalid(b.Build(), "power of two");
  }
  {
    GgufBuilder b;
    b.Add<uint8_t>("k", t::kGBool, 7);
    ExpectInvalid(b.Build(), "bool value");
  }
}

TEST(GgufTest, CorruptTensorInfos) {
  GgufBuilder::Layout l;
  const std::vector<uint8_t> good = SmallBuilder().Build(&l);
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.tensor_offset[2], 1u << 20);
    ExpectInvalid(b, "beyond the end of the file");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.tensor_offset[2], ~uint64_t{0} - 31);  // aligned, wraps if added
    ExpectInvalid(b, "beyond the end of the file");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.tensor_offset[1], 4);
    ExpectInvalid(b, "not a multiple of the alignment");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint32_t>(&b, l.tensor_type[0], 1234);
    ExpectInvalid(b, "unknown or unsupported ggml type 1234");
  }
  {
    std::vector<uint8_t> b = good;  // 3 x 2^62 elements
    Poke<uint64_t>(&b, l.tensor_dims[0] + 8, uint64_t{1} << 62);
    ExpectInvalid(b, "dimensions overflow");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint32_t>(&b, l.tensor_ndims[0], 9);
    ExpectInvalid(b, "dimensions (max 4)");
  }
  {
    std::vector<uint8_t> b = good;  // Q8_0 row of 31 elements
    Poke<uint64_t>(&b, l.tensor_dims[1], 31);
    ExpectInvalid(b, "not a multiple of the Q8_0 block size");
  }
  {
    std::vector<uint8_t> b = good;  // two tensors at the same offset
    Poke<uint64_t>(&b, l.tensor_offset[2], 0);
    ExpectInvalid(b, "overlap");
  }
  {
    std::vector<uint8_t> b = good;
    Poke<uint64_t>(&b, l.tensor_name_len[1], uint64_t{1} << 40);
    ExpectInvalid(b, "tensor name length");
  }
  {
    GgufBuilder b;
    b.AddTensor("x", t::kGgmlF32, {1}, AsBytes(std::vector<float>{1}));
    b.AddTensor("x", t::kGgmlF32, {1}, AsBytes(std::vector<float>{2}));
    ExpectInvalid(b.Build(), "duplicate tensor name");
  }
}

TEST(GgufTest, MissingFile) {
  EXPECT_EQ(GgufFile::Open("/nonexistent/x.gguf").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufSmolLm2Test, ParsesRealModel) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.metadata().size(), 33u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetInt("llama.block_count"), 30);
  EXPECT_EQ(*g.GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*g.GetInt("llama.feed_forward_length"), 1536);
  EXPECT_EQ(*g.GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(*g.GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(*g.GetInt("llama.context_length"), 8192);
  EXPECT_EQ(*g.GetFloat("llama.rope.freq_base"), 100000.0);
  EXPECT_FLOAT_EQ(static_cast<float>(*g.GetFloat("llama.attention.layer_norm_rms_epsilon")), 1e-5f);
  EXPECT_EQ(*g.GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_FALSE(*g.GetBool("tokenizer.ggml.add_bos_token"));
  absl::StatusOr<std::vector<std::string>> tokens = g.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok());
  EXPECT_EQ(tokens->size(), 49152u);
  EXPECT_EQ(g.GetStringArray("tokenizer.ggml.merges")->size(), 48900u);
  EXPECT_EQ(*g.GetInt("tokenizer.ggml.eos_token_id"), 2);

  ASSERT_EQ(g.tensors().size(), 272u);
  std::map<TensorType, int> counts;
  for (const TensorInfo& ti : g.tensors()) counts[ti.type]++;
  EXPECT_EQ(counts[TensorType::kQ4_1], 210);
  EXPECT_EQ(counts[TensorType::kF32], 61);
  EXPECT_EQ(counts[TensorType::kQ8_0], 1);
  const TensorInfo* down = g.Find("blk.0.ffn_down.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->shape, (std::vector<int64_t>{576, 1536}));
  EXPECT_EQ(down->nbytes, 576u * 1536 / 32 * 20);
  const TensorInfo* emb = g.Find("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, TensorType::kQ8_0);
  EXPECT_EQ(emb->shape, (std::vector<int64_t>{49152, 576}));
  EXPECT_EQ(g.Find("blk.29.attn_k.weight")->shape, (std::vector<int64_t>{192, 576}));
  EXPECT_EQ(g.Find("output_norm.weight")->shape, (std::vector<int64_t>{576}));
  EXPECT_EQ(g.Find("output.weight"), nullptr);  // tied embeddings

  // Every tensor dequantizes; norms are finite and non-trivial.
  for (const TensorInfo& ti : g.tensors()) {
    std::vector<float> out(ti.numel());
    ASSERT_TRUE(Dequantize(ti, out.data()).ok()) << ti.name;
    double sumsq = 0;
    for (float x : out) sumsq += double{x} * x;
    EXPECT_TRUE(std::isfinite(sumsq) && sumsq > 0) << ti.name;
  }
}

}  // namespace
}  // namespace spear::model
