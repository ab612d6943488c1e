#include "worker/model/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

namespace spear::model {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "spear_st_XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// An 8-byte little-endian header length, the header, then the data.
std::vector<uint8_t> RawFile(const std::string& header, size_t data_bytes,
                             std::optional<uint64_t> len = std::nullopt) {
  std::vector<uint8_t> b(8);
  const uint64_t n = len.value_or(header.size());
  for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(n >> (8 * i));
  b.insert(b.end(), header.begin(), header.end());
  b.resize(b.size() + data_bytes, 0xAB);
  return b;
}

void WriteBytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

void ExpectInvalid(const std::vector<uint8_t>& bytes, const std::string& substr) {
  auto f = SafetensorsFile::FromBuffer(bytes.data(), bytes.size(), "bad.safetensors");
  ASSERT_FALSE(f.ok()) << "expected failure containing: " << substr;
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
  EXPECT_NE(f.status().message().find(substr), std::string::npos) << f.status();
  EXPECT_NE(f.status().message().find("bad.safetensors"), std::string::npos) << f.status();
}

TEST(SafetensorsTest, RoundTripAllDtypes) {
  TempDir dir;
  struct Case {
    std::string name;
    TensorType type;
    size_t elsize;
    std::vector<int64_t> shape;
  };
  const std::vector<Case> cases = {
      {"f32", TensorType::kF32, 4, {2, 3}},   {"f16", TensorType::kF16, 2, {5}},
      {"bf16", TensorType::kBF16, 2, {1, 7}}, {"f64", TensorType::kF64, 8, {3}},
      {"i8", TensorType::kI8, 1, {9}},        {"i16", TensorType::kI16, 2, {2, 2}},
      {"i32", TensorType::kI32, 4, {4}},      {"i64", TensorType::kI64, 8, {1}},
      {"u8", TensorType::kU8, 1, {3, 1, 2}},  {"bool", TensorType::kBool, 1, {2}},
      {"scalar", TensorType::kF32, 4, {}},    {"empty", TensorType::kF32, 4, {0, 4}},
  };
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<TensorToWrite> to_write;
  for (size_t i = 0; i < cases.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : cases[i].shape) numel *= d;
    std::vector<uint8_t> p(numel * cases[i].elsize);
    for (size_t k = 0; k < p.size(); ++k) p[k] = static_cast<uint8_t>(i * 31 + k);
    if (cases[i].type == TensorType::kBool) p = {0, 1};
    payloads.push_back(std::move(p));
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    to_write.push_back(
        {cases[i].name, cases[i].type, cases[i].shape, payloads[i].data(), payloads[i].size()});
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "spear test"}};
  const std::string path = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, to_write, meta).ok());

  // The header is padded so the data starts 8-byte aligned.
  std::ifstream in(path, std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  EXPECT_EQ(header_len % 8, 0u);

  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata(), meta);
  EXPECT_EQ((*f)->tensors().size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const TensorInfo* t = (*f)->Find(cases[i].name);
    ASSERT_NE(t, nullptr) << cases[i].name;
    EXPECT_EQ(t->type, cases[i].type) << cases[i].name;
    EXPECT_EQ(t->shape, cases[i].shape) << cases[i].name;
    ASSERT_EQ(t->nbytes, payloads[i].size()) << cases[i].name;
    if (t->nbytes > 0) {
      EXPECT_EQ(std::memcmp(t->data, payloads[i].data(), t->nbytes), 0);
    }
  }
  EXPECT_EQ((*f)->Find("missing"), nullptr);

  // A directory holding model.safetensors opens as a checkpoint.
  auto ckpt = SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->tensors().size(), cases.size());
  EXPECT_NE((*ckpt)->Find("bf16"), nullptr);
}

TEST(SafetensorsTest, WriterRejectsBadInput) {
  TempDir dir;
  float x[2] = {1, 2};
  EXPECT_FALSE(WriteSafetensors(dir / "a", {{"x", TensorType::kF32, {3}, x, 8}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors(dir / "a", {{"x", TensorType::kQ4_0, {2}, x, 8}}, {}).ok());
  EXPECT_FALSE(
      WriteSafetensors(dir / "a",
                       {{"x", TensorType::kF32, {2}, x, 8}, {"x", TensorType::kF32, {2}, x, 8}}, {})
          .ok());
  EXPECT_FALSE(
      WriteSafetensors(dir / "no/such/dir/a", {{"x", TensorType::kF32, {2}, x, 8}}, {}).ok());
}

class ShardedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(WriteSafetensors(dir_ / "model-00001-of-00002.safetensors",
                                 {{"a", TensorType::kF32, {2}, a_, 8}}, {})
                    .ok());
    ASSERT_TRUE(WriteSafetensors(
                    dir_ / "model-00002-of-00002.safetensors",
                    {{"b", TensorType::kF32, {2}, b_, 8}, {"c", TensorType::kF32, {1}, b_, 4}}, {})
                    .ok());
  }
  void WriteIndex(const std::string& weight_map) {
    std::ofstream(dir_ / "model.safetensors.index.json")
        << R"({"metadata": {"total_size": 20}, "weight_map": )" << weight_map << "}";
  }
  TempDir dir_;
  float a_[2] = {1, 2};
  float b_[2] = {3, 4};
};

TEST_F(ShardedTest, OpensIndexAndDirectory) {
  WriteIndex(R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                 "c": "model-00002-of-00002.safetensors"})");
  for (const std::string& p : {dir_ / "model.safetensors.index.json", dir_.path()}) {
    auto ckpt = SafetensorsCheckpoint::Open(p);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ASSERT_EQ((*ckpt)->tensors().size(), 3u);
    const TensorInfo* b = (*ckpt)->Find("b");
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(reinterpret_cast<const float*>(b->data)[1], 4.0f);
    EXPECT_EQ(reinterpret_cast<const float*>((*ckpt)->Find("a")->data)[0], 1.0f);
  }
}

TEST_F(ShardedTest, MissingShardIsAnError) {
  WriteIndex(R"({"a": "model-00001-of-00002.safetensors", "z": "model-00009.safetensors"})");
  auto ckpt = SafetensorsCheckpoint::Open(dir_.path());
  ASSERT_FALSE(ckpt.ok());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ckpt.status().message().find("model-00009.safetensors"), std::string::npos);
}

TEST_F(ShardedTest, TensorMissingFromNamedShard) {
  WriteIndex(
      R"({"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})");
  auto ckpt = SafetensorsCheckpoint::Open(dir_.path());
  ASSERT_FALSE(ckpt.ok());
  EXPECT_NE(ckpt.status().message().find("\"a\" is missing"), std::string::npos) << ckpt.status();
}

TEST_F(ShardedTest, NameInTwoShards) {
  ASSERT_TRUE(WriteSafetensors(dir_ / "model-00001-of-00002.safetensors",
                               {{"b", TensorType::kF32, {2}, a_, 8}}, {})
                  .ok());
  WriteIndex(
      R"({"b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"})");
  auto ckpt = SafetensorsCheckpoint::Open(dir_.path());
  ASSERT_FALSE(ckpt.ok());
  EXPECT_NE(ckpt.status().message().find("two shards"), std::string::npos) << ckpt.status();
}

TEST_F(ShardedTest, BadIndexJson) {
  std::ofstream(dir_ / "model.safetensors.index.json") << R"({"weight_map": [1, 2]})";
  EXPECT_FALSE(SafetensorsCheckpoint::Open(dir_.path()).ok());
  std::ofstream(dir_ / "model.safetensors.index.json") << "{not json";
  EXPECT_FALSE(SafetensorsCheckpoint::Open(dir_.path()).ok());
}

TEST(SafetensorsTest, EmptyDirectoryIsNotFound) {
  TempDir dir;
  EXPECT_EQ(SafetensorsCheckpoint::Open(dir.path()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SafetensorsFile::Open(dir / "absent").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SafetensorsFile::Open(dir.path()).status().code(),
            absl::StatusCode::kInvalidArgument);  // a directory
}

const char kGoodHeader[] = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F16","shape":[2,2],"data_offsets":[8,16]}})";

TEST(SafetensorsCorruptTest, BaselineParses) {
  const std::vector<uint8_t> b = RawFile(kGoodHeader, 16);
  auto f = SafetensorsFile::FromBuffer(b.data(), b.size(), "ok");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 2u);
}

TEST(SafetensorsCorruptTest, TruncatedHeaderLength) {
  ExpectInvalid({0x10, 0, 0}, "too short");
  ExpectInvalid({}, "too short");
}

TEST(SafetensorsCorruptTest, HeaderLengthBeyondFile) {
  ExpectInvalid(RawFile(kGoodHeader, 16, 1 << 20), "exceeds the file");
  ExpectInvalid(RawFile(kGoodHeader, 16, ~uint64_t{0} - 1), "exceeds the file");
}

TEST(SafetensorsCorruptTest, BadJson) {
  ExpectInvalid(RawFile(R"({"a": {"dtype": "F32", )", 0), "invalid JSON");
  ExpectInvalid(RawFile("[1, 2, 3]", 0), "not a JSON object");
  ExpectInvalid(RawFile(R"({"a": 5})", 0), "not a JSON object");
  ExpectInvalid(RawFile("", 0), "empty");
}

TEST(SafetensorsCorruptTest, UnknownDtype) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
                "unknown dtype \"F8_E4M3\"");
  ExpectInvalid(RawFile(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,2]}})", 2), "dtype");
}

TEST(SafetensorsCorruptTest, OffsetsOutsideData) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
                "exceed the data section");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
                "reversed");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
                "data_offsets");
}

TEST(SafetensorsCorruptTest, SizeNotNumelTimesElementSize) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
                "needs 12");
}

TEST(SafetensorsCorruptTest, OverlappingTensors) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        12),
                "overlap");
}

TEST(SafetensorsCorruptTest, NegativeOrHugeShape) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                "non-negative");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],)"
                        R"("data_offsets":[0,8]}})",
                        8),
                "overflows");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[1e30],"data_offsets":[0,8]}})", 8),
                "non-negative integer");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F64","shape":[2305843009213693952],)"
                        R"("data_offsets":[0,8]}})",
                        8),
                "overflows");
}

TEST(SafetensorsCorruptTest, DuplicateNames) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                        8),
                "duplicate key \"a\"");
}

TEST(SafetensorsCorruptTest, BadMetadataAndFields) {
  ExpectInvalid(RawFile(R"({"__metadata__":{"k":1}})", 0), "not a string");
  ExpectInvalid(RawFile(R"({"__metadata__":[]})", 0), "__metadata__");
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", 4),
                "unexpected field");
}

TEST(SafetensorsCorruptTest, DeepNesting) {
  const std::string deep =
      R"({"__metadata__":)" + std::string(5000, '[') + std::string(5000, ']') + "}";
  ExpectInvalid(RawFile(deep, 0), "nested");
}

TEST(SafetensorsCorruptTest, TruncatedFileOnDisk) {
  TempDir dir;
  std::vector<uint8_t> b = RawFile(kGoodHeader, 16);
  b.resize(b.size() - 3);
  WriteBytes(dir / "t.safetensors", b);
  auto f = SafetensorsFile::Open(dir / "t.safetensors");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(f.status().message().find("t.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace spear::model
