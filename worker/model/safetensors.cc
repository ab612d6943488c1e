#include "worker/model/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace spear::model {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// The JSON header of a real checkpoint is a few hundred KiB; the HF library
// refuses headers over 100 MB, and so do we.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;
// Nesting deeper than this cannot occur in a valid header.
constexpr int kMaxJsonDepth = 16;

struct DtypeEntry {
  const char* name;
  TensorType type;
  size_t size;
};
constexpr DtypeEntry kDtypes[] = {
    {"F32", TensorType::kF32, 4},   {"F16", TensorType::kF16, 2}, {"BF16", TensorType::kBF16, 2},
    {"F64", TensorType::kF64, 8},   {"I8", TensorType::kI8, 1},   {"I16", TensorType::kI16, 2},
    {"I32", TensorType::kI32, 4},   {"I64", TensorType::kI64, 8}, {"U8", TensorType::kU8, 1},
    {"BOOL", TensorType::kBool, 1},
};

const DtypeEntry* DtypeByName(const std::string& name) {
  for (const DtypeEntry& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeEntry* DtypeByType(TensorType t) {
  for (const DtypeEntry& d : kDtypes) {
    if (t == d.type) return &d;
  }
  return nullptr;
}

// Parses JSON without exceptions, rejecting duplicate object keys at any
// depth (nlohmann would silently keep the last one) and absurd nesting.
absl::StatusOr<json> ParseStrictJson(const char* begin, const char* end, const std::string& what) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  bool too_deep = false;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxJsonDepth) {
      too_deep = true;
      return false;  // do not store anything this deep
    }
    switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && parsed.is_string()) {
          const std::string& k = parsed.get_ref<const std::string&>();
          if (!keys.back().insert(k).second && duplicate.empty()) duplicate = k;
        }
        break;
      default:
        break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(begin, end, cb, /*allow_exceptions=*/false);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON: ", e.what()));
  }
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON"));
  if (too_deep) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": JSON nested deeper than ", kMaxJsonDepth, " levels"));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": duplicate key \"", duplicate, "\""));
  }
  return j;
}

// Reads a JSON number as a non-negative int64; false for anything else.
bool NonNegativeInt(const json& v, int64_t* out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = i;
    return true;
  }
  return false;
}

struct Parsed {
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

absl::Status ParseTensorEntry(const std::string& file, const std::string& name, const json& e,
                              const uint8_t* data_section, uint64_t data_size, TensorInfo* out,
                              uint64_t* begin_out) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor \"", name, "\": ", why));
  };
  if (!e.is_object()) return bad("entry is not a JSON object");
  for (auto it = e.begin(); it != e.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
      return bad(absl::StrCat("unexpected field \"", it.key(), "\""));
    }
  }
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) return bad("missing or non-string \"dtype\"");
  const std::string& dtype_name = dt->get_ref<const std::string&>();
  const DtypeEntry* dtype = DtypeByName(dtype_name);
  if (dtype == nullptr) return bad(absl::StrCat("unknown dtype \"", dtype_name, "\""));

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return bad("missing or non-array \"shape\"");
  std::vector<int64_t> shape;
  uint64_t numel = 1;
  for (const json& d : *sh) {
    int64_t dim;
    if (!NonNegativeInt(d, &dim)) {
      return bad(absl::StrCat("shape entry ", d.dump(), " is not a non-negative integer"));
    }
    shape.push_back(dim);
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel)) {
      return bad("shape element count overflows 64 bits");
    }
  }
  uint64_t expect_bytes;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype->size), &expect_bytes) ||
      numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return bad("shape byte size overflows 64 bits");
  }

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2) {
    return bad("\"data_offsets\" must be an array [begin, end]");
  }
  int64_t begin, end;
  if (!NonNegativeInt((*off)[0], &begin) || !NonNegativeInt((*off)[1], &end)) {
    return bad("\"data_offsets\" entries must be non-negative integers");
  }
  if (begin > end) return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] are reversed"));
  if (static_cast<uint64_t>(end) > data_size) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] exceed the data section (",
                            data_size, " bytes)"));
  }
  const uint64_t nbytes = static_cast<uint64_t>(end - begin);
  if (nbytes != expect_bytes) {
    return bad(absl::StrCat("holds ", nbytes, " bytes but shape [", absl::StrJoin(shape, ", "),
                            "] of ", dtype->name, " needs ", expect_bytes));
  }
  out->name = name;
  out->type = dtype->type;
  out->shape = std::move(shape);
  out->data = data_section + begin;
  out->nbytes = static_cast<size_t>(nbytes);
  *begin_out = static_cast<uint64_t>(begin);
  return absl::OkStatus();
}

absl::StatusOr<Parsed> ParseSafetensors(const uint8_t* data, size_t size, const std::string& file) {
  if (size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": ", size, " bytes is too short for the 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];  // little-endian
  if (header_len > size - 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": header length ", header_len, " exceeds the file (", size, " bytes)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": header length ", header_len, " exceeds the 100 MB limit"));
  }
  if (header_len < 2) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header is empty"));
  }
  const char* hbegin = reinterpret_cast<const char*>(data + 8);
  absl::StatusOr<json> header =
      ParseStrictJson(hbegin, hbegin + header_len, absl::StrCat(file, ": header"));
  if (!header.ok()) return header.status();
  if (!header->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header is not a JSON object"));
  }
  const uint8_t* data_section = data + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  Parsed p;
  std::vector<std::pair<uint64_t, size_t>> spans;  // (begin, index) of non-empty tensors
  for (auto it = header->begin(); it != header->end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(file, ": __metadata__ is not an object"));
      }
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(file, ": __metadata__ value of \"", m.key(), "\" is not a string"));
        }
        p.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    TensorInfo t;
    uint64_t begin = 0;
    absl::Status s = ParseTensorEntry(file, it.key(), *it, data_section, data_size, &t, &begin);
    if (!s.ok()) return s;
    if (t.nbytes > 0) spans.emplace_back(begin, p.tensors.size());
    p.tensors.push_back(std::move(t));
  }
  // Sorted by start, each non-empty tensor must begin at or after the end of
  // the previous one.
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    const TensorInfo& prev = p.tensors[spans[i - 1].second];
    const uint64_t prev_end = spans[i - 1].first + prev.nbytes;
    if (spans[i].first < prev_end) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensors \"", prev.name, "\" and \"",
                                                     p.tensors[spans[i].second].name,
                                                     "\" overlap"));
    }
  }
  return p;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(
    const uint8_t* data, size_t size, const std::string& name) {
  absl::StatusOr<Parsed> p = ParseSafetensors(data, size, name);
  if (!p.ok()) return p.status();
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->tensors_ = std::move(p->tensors);
  f->metadata_ = std::move(p->metadata);
  for (size_t i = 0; i < f->tensors_.size(); ++i) f->index_[f->tensors_[i].name] = i;
  return f;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<std::unique_ptr<MappedFile>> m = MappedFile::Open(path);
  if (!m.ok()) return m.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = FromBuffer((*m)->data(), (*m)->size(), path);
  if (!f.ok()) return f.status();
  (*f)->file_ = std::move(*m);
  return f;
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& path) {
  std::error_code ec;
  std::string target = path;
  if (fs::is_directory(path, ec)) {
    const fs::path dir(path);
    if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      target = (dir / "model.safetensors.index.json").string();
    } else if (fs::exists(dir / "model.safetensors", ec)) {
      target = (dir / "model.safetensors").string();
    } else {
      return absl::NotFoundError(
          absl::StrCat(path, " holds neither model.safetensors nor model.safetensors.index.json"));
    }
  }
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  // (tensor name -> shard file name) when reading an index, else empty.
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> shard_paths;
  const bool is_index = target.size() >= 5 && target.compare(target.size() - 5, 5, ".json") == 0;
  if (is_index) {
    std::ifstream in(target, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read index ", target));
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    absl::StatusOr<json> j = ParseStrictJson(text.data(), text.data() + text.size(), target);
    if (!j.ok()) return j.status();
    auto wm = j->is_object() ? j->find("weight_map") : j->end();
    if (wm == j->end() || !wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(target, ": no \"weight_map\" object"));
    }
    std::set<std::string> shards;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it->is_string() || it->get_ref<const std::string&>().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(target, ": weight_map entry \"", it.key(), "\" is not a file name"));
      }
      weight_map[it.key()] = it->get<std::string>();
      shards.insert(it->get<std::string>());
    }
    const fs::path dir = fs::path(target).parent_path();
    for (const std::string& s : shards) shard_paths.push_back((dir / s).string());
  } else {
    shard_paths.push_back(target);
  }

  for (const std::string& sp : shard_paths) {
    if (!fs::exists(sp, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat(target, ": shard ", sp, " named by the index is missing"));
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(sp);
    if (!f.ok()) return f.status();
    for (const TensorInfo& t : (*f)->tensors()) {
      auto [it, inserted] = ckpt->by_name_.emplace(t.name, &t);
      if (!inserted) {
        return absl::InvalidArgumentError(
            absl::StrCat(target, ": tensor \"", t.name, "\" appears in two shards (", sp, ")"));
      }
    }
    ckpt->shards_.push_back(std::move(*f));
  }
  // Every tensor the index names must be in the shard it names.
  const fs::path dir = fs::path(target).parent_path();
  for (const auto& [name, shard] : weight_map) {
    const std::string want = (dir / shard).string();
    for (size_t i = 0; i < shard_paths.size(); ++i) {
      if (shard_paths[i] != want) continue;
      if (ckpt->shards_[i]->Find(name) == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat(target, ": tensor \"", name, "\" is missing from shard ", want));
      }
    }
  }
  return ckpt;
}

const TensorInfo* SafetensorsCheckpoint::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::vector<const TensorInfo*> SafetensorsCheckpoint::tensors() const {
  std::vector<const TensorInfo*> out;
  out.reserve(by_name_.size());
  for (const auto& [name, t] : by_name_) out.push_back(t);
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    const DtypeEntry* dtype = DtypeByType(t.type);
    if (dtype == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors cannot store ", std::string(TensorTypeName(t.type)), " tensor ", t.name));
    }
    if (t.name.empty() || t.name == "__metadata__" || header.contains(t.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad or duplicate tensor name \"", t.name, "\""));
    }
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) {
        return absl::InvalidArgumentError(absl::StrCat("bad shape for tensor ", t.name));
      }
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, dtype->size, &nbytes) || nbytes != t.nbytes ||
        (nbytes > 0 && t.data == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", t.name, ": ", t.nbytes, " bytes given, shape needs ", nbytes));
    }
    header[t.name] = {
        {"dtype", dtype->name}, {"shape", t.shape}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned (as the HF library does).
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot create ", tmp));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  bool ok =
      std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const TensorToWrite& t : tensors) {
    if (ok && t.nbytes > 0) ok = std::fwrite(t.data, 1, t.nbytes, f) == t.nbytes;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("short write to ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

}  // namespace spear::model
