#include "worker/model/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace spear::model {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read little-endian
constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;            // nested arrays deeper than this are rejected
// Metadata values held in memory cost ~48 bytes each whatever their size in
// the file; the largest real tokenizers hold well under a million. The cap
// keeps a crafted file of tiny array elements from costing gigabytes.
constexpr uint64_t kMaxMetadataValues = uint64_t{1} << 23;

enum GgufType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

// ggml type ids (ggml.h, enum ggml_type) of the types TensorType can hold.
std::optional<TensorType> TypeFromGgml(uint32_t id) {
  switch (id) {
    case 0:
      return TensorType::kF32;
    case 1:
      return TensorType::kF16;
    case 2:
      return TensorType::kQ4_0;
    case 3:
      return TensorType::kQ4_1;
    case 6:
      return TensorType::kQ5_0;
    case 7:
      return TensorType::kQ5_1;
    case 8:
      return TensorType::kQ8_0;
    case 10:
      return TensorType::kQ2_K;
    case 11:
      return TensorType::kQ3_K;
    case 12:
      return TensorType::kQ4_K;
    case 13:
      return TensorType::kQ5_K;
    case 14:
      return TensorType::kQ6_K;
    case 24:
      return TensorType::kI8;
    case 25:
      return TensorType::kI16;
    case 26:
      return TensorType::kI32;
    case 27:
      return TensorType::kI64;
    case 28:
      return TensorType::kF64;
    case 30:
      return TensorType::kBF16;
    default:
      return std::nullopt;
  }
}

// Bytes a value of `type` occupies at least; 0 for an unknown type. Used to
// bound counts against the bytes left before anything is allocated.
uint64_t MinValueBytes(uint32_t type) {
  switch (type) {
    case kU8:
    case kI8:
    case kBool:
      return 1;
    case kU16:
    case kI16:
      return 2;
    case kU32:
    case kI32:
    case kF32:
      return 4;
    case kU64:
    case kI64:
    case kF64:
      return 8;
    case kString:
      return 8;  // length prefix
    case kArray:
      return 12;  // element type + count
    default:
      return 0;
  }
}

// Bounds-checked little-endian cursor over the file. Every read either
// succeeds or records an error naming the offset; it never reads past `size`.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::string& name)
      : data_(data), size_(size), name_(name) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": ", what, " (at byte ", pos_, ")"));
  }

  template <typename T>
  absl::Status Read(T* out, const char* what) {
    if (left() < sizeof(T)) {
      return Error(absl::StrCat("truncated file: cannot read ", what));
    }
    std::memcpy(out, data_ + pos_, sizeof(T));  // GGUF is little-endian, as is the host
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  absl::Status ReadString(std::string* out, const char* what) {
    uint64_t len = 0;
    absl::Status s = Read(&len, what);
    if (!s.ok()) return s;
    if (len > left()) {
      return Error(
          absl::StrCat(what, " length ", len, " exceeds the ", left(), " bytes left in the file"));
    }
    out->assign(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return absl::OkStatus();
  }

  absl::Status ReadValue(uint32_t type, GgufValue* out, int depth) {
    out->type = type;
    switch (type) {
      case kU8:
        return ReadAs<uint8_t, uint64_t>(out);
      case kI8:
        return ReadAs<int8_t, int64_t>(out);
      case kU16:
        return ReadAs<uint16_t, uint64_t>(out);
      case kI16:
        return ReadAs<int16_t, int64_t>(out);
      case kU32:
        return ReadAs<uint32_t, uint64_t>(out);
      case kI32:
        return ReadAs<int32_t, int64_t>(out);
      case kU64:
        return ReadAs<uint64_t, uint64_t>(out);
      case kI64:
        return ReadAs<int64_t, int64_t>(out);
      case kF32:
        return ReadAs<float, double>(out);
      case kF64:
        return ReadAs<double, double>(out);
      case kBool: {
        uint8_t b = 0;
        absl::Status s = Read(&b, "bool value");
        if (!s.ok()) return s;
        if (b > 1) return Error(absl::StrCat("bool value ", int{b}, " is neither 0 nor 1"));
        out->v = (b != 0);
        return absl::OkStatus();
      }
      case kString: {
        std::string str;
        absl::Status s = ReadString(&str, "string value");
        if (!s.ok()) return s;
        out->v = std::move(str);
        return absl::OkStatus();
      }
      case kArray:
        return ReadArray(out, depth);
      default:
        return Error(absl::StrCat("unknown metadata value type ", type));
    }
  }

 private:
  template <typename Raw, typename Wide>
  absl::Status ReadAs(GgufValue* out) {
    Raw r{};
    absl::Status s = Read(&r, "metadata value");
    if (!s.ok()) return s;
    out->v = static_cast<Wide>(r);
    return absl::OkStatus();
  }

  absl::Status ReadArray(GgufValue* out, int depth) {
    if (depth >= kMaxArrayDepth) {
      return Error(absl::StrCat("arrays nested deeper than ", kMaxArrayDepth, " levels"));
    }
    uint32_t elem_type = 0;
    uint64_t count = 0;
    absl::Status s = Read(&elem_type, "array element type");
    if (s.ok()) s = Read(&count, "array length");
    if (!s.ok()) return s;
    const uint64_t min_bytes = MinValueBytes(elem_type);
    if (min_bytes == 0) return Error(absl::StrCat("unknown array element type ", elem_type));
    // Bound the count by what the remaining bytes could hold.
    if (count > left() / min_bytes) {
      return Error(absl::StrCat("array length ", count, " cannot fit in the ", left(),
                                " bytes left in the file"));
    }
    if (count > kMaxMetadataValues - values_) {
      return Error(absl::StrCat("array length ", count, " exceeds the limit of ",
                                kMaxMetadataValues, " metadata values per file"));
    }
    values_ += count;
    GgufArray arr;
    arr.resize(static_cast<size_t>(count));
    for (GgufValue& e : arr) {
      s = ReadValue(elem_type, &e, depth + 1);
      if (!s.ok()) return s;
    }
    out->v = std::move(arr);
    return absl::OkStatus();
  }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  uint64_t values_ = 0;  // array elements read so far (see kMaxMetadataValues)
  const std::string& name_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBuffer(const uint8_t* data, size_t size,
                                                               const std::string& name) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  Reader r(data, size, name);
  uint32_t magic = 0, version = 0;
  absl::Status s = r.Read(&magic, "magic");
  if (!s.ok()) return s;
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": not a GGUF file (bad magic)"));
  }
  s = r.Read(&version, "version");
  if (!s.ok()) return s;
  if (version == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name,
                     ": GGUF version 1 is not supported (only v2 and v3); "
                     "re-convert the model with a current llama.cpp"));
  }
  if ((version & 0xFFFF) == 0 && version != 0) {
    // A small version number stored in the other byte order.
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": big-endian GGUF (version ", __builtin_bswap32(version), ") is not supported"));
  }
  if (version != 2 && version != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unsupported GGUF version ", version, " (expected 2 or 3)"));
  }
  f->version_ = version;
  uint64_t n_tensors = 0, n_kv = 0;
  s = r.Read(&n_tensors, "tensor count");
  if (s.ok()) s = r.Read(&n_kv, "metadata count");
  if (!s.ok()) return s;
  // Minimal encodings: a key/value takes >= 13 bytes (key length, type, one
  // byte of value), a tensor info >= 24 (name length, n_dims, type, offset).
  if (n_kv > r.left() / 13) {
    return r.Error(absl::StrCat("metadata count ", n_kv, " cannot fit in the file"));
  }
  if (n_tensors > r.left() / 24) {
    return r.Error(absl::StrCat("tensor count ", n_tensors, " cannot fit in the file"));
  }

  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    uint32_t type = 0;
    s = r.ReadString(&key, "metadata key");
    if (s.ok()) s = r.Read(&type, "metadata value type");
    if (!s.ok()) return s;
    GgufValue value;
    s = r.ReadValue(type, &value, 0);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(s.message(), " in key \"", key, "\""));
    }
    if (!f->metadata_.emplace(key, std::move(value)).second) {
      return r.Error(absl::StrCat("duplicate metadata key \"", key, "\""));
    }
  }

  if (const GgufValue* a = f->Get("general.alignment")) {
    const uint64_t* al = std::get_if<uint64_t>(&a->v);
    if (al == nullptr || a->type != kU32 || *al == 0 || (*al & (*al - 1)) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": general.alignment must be a uint32 power of two"));
    }
    f->alignment_ = static_cast<size_t>(*al);
  }

  std::vector<uint64_t> offsets;
  f->tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    uint32_t n_dims = 0;
    s = r.ReadString(&t.name, "tensor name");
    if (s.ok()) s = r.Read(&n_dims, "tensor dimension count");
    if (!s.ok()) return s;
    if (n_dims > kMaxDims) {
      return r.Error(
          absl::StrCat("tensor \"", t.name, "\" has ", n_dims, " dimensions (max ", kMaxDims, ")"));
    }
    std::vector<uint64_t> dims(n_dims);  // innermost first, as stored
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      s = r.Read(&dims[d], "tensor dimension");
      if (!s.ok()) return s;
      if (dims[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(numel, dims[d], &numel) ||
          numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return r.Error(absl::StrCat("tensor \"", t.name, "\": dimensions overflow"));
      }
    }
    uint32_t ggml_type = 0;
    uint64_t offset = 0;
    s = r.Read(&ggml_type, "tensor type");
    if (s.ok()) s = r.Read(&offset, "tensor offset");
    if (!s.ok()) return s;
    const std::optional<TensorType> type = TypeFromGgml(ggml_type);
    if (!type.has_value()) {
      return r.Error(
          absl::StrCat("tensor \"", t.name, "\": unknown or unsupported ggml type ", ggml_type));
    }
    const uint64_t row = n_dims > 0 ? dims[0] : 1;
    const uint64_t block_elems = static_cast<uint64_t>(BlockElems(*type));
    if (row % block_elems != 0) {
      return r.Error(absl::StrCat("tensor \"", t.name, "\": row length ", row,
                                  " is not a multiple of the ", std::string(TensorTypeName(*type)),
                                  " block size ", block_elems));
    }
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel / block_elems, uint64_t{BlockBytes(*type)}, &nbytes) ||
        nbytes > std::numeric_limits<size_t>::max()) {
      return r.Error(absl::StrCat("tensor \"", t.name, "\": byte size overflows"));
    }
    if (offset % f->alignment_ != 0) {
      return r.Error(absl::StrCat("tensor \"", t.name, "\": offset ", offset,
                                  " is not a multiple of the alignment ", f->alignment_));
    }
    t.type = *type;
    t.shape.assign(dims.rbegin(), dims.rend());  // outermost first
    t.nbytes = static_cast<size_t>(nbytes);
    if (!f->index_.emplace(t.name, f->tensors_.size()).second) {
      return r.Error(absl::StrCat("duplicate tensor name \"", t.name, "\""));
    }
    f->tensors_.push_back(std::move(t));
    offsets.push_back(offset);
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t info_end = r.pos();
  const uint64_t data_start = (info_end + f->alignment_ - 1) / f->alignment_ * f->alignment_;
  if (n_tensors > 0 && data_start > size) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": truncated file: data section would start at ", data_start,
                     " but the file has ", size, " bytes"));
  }
  const uint64_t data_size = data_start <= size ? size - data_start : 0;
  std::vector<std::pair<uint64_t, size_t>> spans;
  for (size_t i = 0; i < f->tensors_.size(); ++i) {
    TensorInfo& t = f->tensors_[i];
    if (offsets[i] > data_size || t.nbytes > data_size - offsets[i]) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": tensor \"", t.name, "\" (offset ", offsets[i], ", ", t.nbytes,
          " bytes) extends beyond the end of the file (data section holds ", data_size, ")"));
    }
    t.data = data + data_start + offsets[i];
    if (t.nbytes > 0) spans.emplace_back(offsets[i], i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const TensorInfo& prev = f->tensors_[spans[i - 1].second];
    if (spans[i].first < spans[i - 1].first + prev.nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": tensors \"", prev.name, "\" and \"",
                                                     f->tensors_[spans[i].second].name,
                                                     "\" overlap"));
    }
  }
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  absl::StatusOr<std::unique_ptr<MappedFile>> m = MappedFile::Open(path);
  if (!m.ok()) return m.status();
  absl::StatusOr<std::unique_ptr<GgufFile>> f = FromBuffer((*m)->data(), (*m)->size(), path);
  if (!f.ok()) return f.status();
  (*f)->file_ = std::move(*m);
  return f;
}

const GgufValue* GgufFile::Get(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {

absl::Status WrongType(const std::string& key, const char* want) {
  return absl::InvalidArgumentError(absl::StrCat("GGUF key \"", key, "\" is not ", want));
}

// Integer value of v (any width, either signedness) if it fits in int64.
std::optional<int64_t> AsInt(const GgufValue& v) {
  if (const int64_t* i = std::get_if<int64_t>(&v.v)) return *i;
  if (const uint64_t* u = std::get_if<uint64_t>(&v.v)) {
    if (*u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>(*u);
    }
  }
  return std::nullopt;
}

std::optional<double> AsFloat(const GgufValue& v) {
  if (const double* d = std::get_if<double>(&v.v)) return *d;
  if (const int64_t* i = std::get_if<int64_t>(&v.v)) return static_cast<double>(*i);
  if (const uint64_t* u = std::get_if<uint64_t>(&v.v)) return static_cast<double>(*u);
  return std::nullopt;
}

}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  if (const std::string* s = std::get_if<std::string>(&v->v)) return *s;
  return WrongType(key, "a string");
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  if (std::optional<int64_t> i = AsInt(*v)) return *i;
  return WrongType(key, "an integer that fits in int64");
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  if (std::optional<double> d = AsFloat(*v)) return *d;
  return WrongType(key, "a number");
}

absl::StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  if (const bool* b = std::get_if<bool>(&v->v)) return *b;
  return WrongType(key, "a bool");
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  const GgufArray* a = std::get_if<GgufArray>(&v->v);
  if (a == nullptr) return WrongType(key, "an array");
  std::vector<std::string> out;
  out.reserve(a->size());
  for (const GgufValue& e : *a) {
    const std::string* s = std::get_if<std::string>(&e.v);
    if (s == nullptr) return WrongType(key, "an array of strings");
    out.push_back(*s);
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  const GgufArray* a = std::get_if<GgufArray>(&v->v);
  if (a == nullptr) return WrongType(key, "an array");
  std::vector<int64_t> out;
  out.reserve(a->size());
  for (const GgufValue& e : *a) {
    std::optional<int64_t> i = AsInt(e);
    if (!i.has_value()) return WrongType(key, "an array of integers");
    out.push_back(*i);
  }
  return out;
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(const std::string& key) const {
  const GgufValue* v = Get(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF key \"", key, "\" not found"));
  const GgufArray* a = std::get_if<GgufArray>(&v->v);
  if (a == nullptr) return WrongType(key, "an array");
  std::vector<double> out;
  out.reserve(a->size());
  for (const GgufValue& e : *a) {
    std::optional<double> d = AsFloat(e);
    if (!d.has_value()) return WrongType(key, "an array of numbers");
    out.push_back(*d);
  }
  return out;
}

const TensorInfo* GgufFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace spear::model
