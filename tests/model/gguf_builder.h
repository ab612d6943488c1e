// A tiny GGUF writer for tests and fuzz seeds: builds a file in memory and
// records where each field landed so tests can corrupt precise bytes.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace spear::testing {

// GGUF metadata value type ids.
enum GgufT : uint32_t {
  kGU8 = 0,
  kGI8 = 1,
  kGU16 = 2,
  kGI16 = 3,
  kGU32 = 4,
  kGI32 = 5,
  kGF32 = 6,
  kGBool = 7,
  kGString = 8,
  kGArray = 9,
  kGU64 = 10,
  kGI64 = 11,
  kGF64 = 12,
};
// ggml tensor type ids.
enum GgmlT : uint32_t { kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ4_0 = 2, kGgmlQ4_1 = 3, kGgmlQ8_0 = 8 };

class ByteWriter {
 public:
  template <typename T>
  void Put(T v) {
    const size_t n = buf_.size();
    buf_.resize(n + sizeof(T));
    std::memcpy(buf_.data() + n, &v, sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint64_t>(s.size());
    buf_.insert(buf_.end(), s.begin(), s.end());
  }
  void PutBytes(const std::vector<uint8_t>& b) { buf_.insert(buf_.end(), b.begin(), b.end()); }
  size_t size() const { return buf_.size(); }
  std::vector<uint8_t>& bytes() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

class GgufBuilder {
 public:
  struct Layout {
    size_t tensor_count = 0;   // offset of the u64 tensor count
    size_t kv_count = 0;       // offset of the u64 key/value count
    size_t first_key_len = 0;  // offset of the first key's u64 length
    std::vector<size_t> tensor_name_len, tensor_ndims, tensor_dims, tensor_type, tensor_offset;
    size_t data_start = 0;
  };

  uint32_t version = 3;
  uint64_t alignment = 32;  // used for layout; add general.alignment to store it

  // Raw key/value: `value` holds the encoded value bytes of type `type`.
  void AddRaw(const std::string& key, uint32_t type, const std::vector<uint8_t>& value) {
    kvs_.push_back({key, type, value});
  }
  template <typename T>
  void Add(const std::string& key, uint32_t type, T v) {
    ByteWriter w;
    w.Put(v);
    AddRaw(key, type, w.bytes());
  }
  void AddU32(const std::string& k, uint32_t v) { Add(k, kGU32, v); }
  void AddF32(const std::string& k, float v) { Add(k, kGF32, v); }
  void AddBool(const std::string& k, bool v) { Add<uint8_t>(k, kGBool, v ? 1 : 0); }
  void AddString(const std::string& k, const std::string& v) {
    ByteWriter w;
    w.PutString(v);
    AddRaw(k, kGString, w.bytes());
  }
  void AddStringArray(const std::string& k, const std::vector<std::string>& v) {
    ByteWriter w;
    w.Put<uint32_t>(kGString);
    w.Put<uint64_t>(v.size());
    for (const std::string& s : v) w.PutString(s);
    AddRaw(k, kGArray, w.bytes());
  }
  void AddI32Array(const std::string& k, const std::vector<int32_t>& v) {
    ByteWriter w;
    w.Put<uint32_t>(kGI32);
    w.Put<uint64_t>(v.size());
    for (int32_t x : v) w.Put(x);
    AddRaw(k, kGArray, w.bytes());
  }

  // dims innermost-first, as GGUF stores them. `data` is copied as is.
  void AddTensor(const std::string& name, uint32_t ggml_type, std::vector<uint64_t> dims,
                 std::vector<uint8_t> data) {
    tensors_.push_back({name, ggml_type, std::move(dims), std::move(data)});
  }

  std::vector<uint8_t> Build(Layout* layout = nullptr) const {
    Layout l;
    ByteWriter w;
    w.Put<uint32_t>(0x46554747);
    w.Put<uint32_t>(version);
    l.tensor_count = w.size();
    w.Put<uint64_t>(tensors_.size());
    l.kv_count = w.size();
    w.Put<uint64_t>(kvs_.size());
    l.first_key_len = w.size();
    for (const Kv& kv : kvs_) {
      w.PutString(kv.key);
      w.Put<uint32_t>(kv.type);
      w.PutBytes(kv.value);
    }
    std::vector<uint64_t> offsets;
    uint64_t off = 0;
    for (const Tensor& t : tensors_) {
      offsets.push_back(off);
      off += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      l.tensor_name_len.push_back(w.size());
      w.PutString(t.name);
      l.tensor_ndims.push_back(w.size());
      w.Put<uint32_t>(t.dims.size());
      l.tensor_dims.push_back(w.size());
      for (uint64_t d : t.dims) w.Put<uint64_t>(d);
      l.tensor_type.push_back(w.size());
      w.Put<uint32_t>(t.type);
      l.tensor_offset.push_back(w.size());
      w.Put<uint64_t>(offsets[i]);
    }
    while (w.size() % alignment != 0) w.Put<uint8_t>(0);
    l.data_start = w.size();
    for (const Tensor& t : tensors_) {
      w.PutBytes(t.data);
      while ((w.size() - l.data_start) % alignment != 0) w.Put<uint8_t>(0);
    }
    if (layout != nullptr) *layout = l;
    return w.bytes();
  }

 private:
  struct Kv {
    std::string key;
    uint32_t type;
    std::vector<uint8_t> value;
  };
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> dims;
    std::vector<uint8_t> data;
  };
  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
};

template <typename T>
void Poke(std::vector<uint8_t>* buf, size_t offset, T v) {
  std::memcpy(buf->data() + offset, &v, sizeof(T));
}

template <typename T>
std::vector<uint8_t> AsBytes(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

}  // namespace spear::testing
