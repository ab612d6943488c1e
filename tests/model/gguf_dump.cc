// spear_gguf_dump FILE [NAME...]: streams dequantized GGUF tensors to stdout
// for gguf_crosscheck.py. Per tensor: a line "name<TAB>d0,d1,...<TAB>numel"
// (shape outermost-first) followed by numel little-endian float32 values.
// With no names, every tensor in file order. Exit 1 on any error.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "worker/model/gguf.h"

int main(int argc, char** argv) {
  using spear::model::GgufFile;
  using spear::model::TensorInfo;
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE.gguf [TENSOR...]\n", argv[0]);
    return 2;
  }
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(argv[1]);
  if (!f.ok()) {
    std::fprintf(stderr, "%s\n", f.status().ToString().c_str());
    return 1;
  }
  std::vector<const TensorInfo*> todo;
  if (argc == 2) {
    for (const TensorInfo& t : (*f)->tensors()) todo.push_back(&t);
  } else {
    for (int i = 2; i < argc; ++i) {
      const TensorInfo* t = (*f)->Find(argv[i]);
      if (t == nullptr) {
        std::fprintf(stderr, "no tensor %s\n", argv[i]);
        return 1;
      }
      todo.push_back(t);
    }
  }
  std::vector<float> buf;
  for (const TensorInfo* t : todo) {
    buf.resize(static_cast<size_t>(t->numel()));
    absl::Status s = spear::model::Dequantize(*t, buf.data());
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      return 1;
    }
    const std::string line =
        t->name + "\t" + absl::StrJoin(t->shape, ",") + "\t" + std::to_string(buf.size()) + "\n";
    if (std::fwrite(line.data(), 1, line.size(), stdout) != line.size() ||
        std::fwrite(buf.data(), sizeof(float), buf.size(), stdout) != buf.size()) {
      return 1;
    }
  }
  return std::fflush(stdout) == 0 ? 0 : 1;
}
