// libFuzzer target: safetensors parsing (and, on the same bytes, HF
// config.json parsing). Every input must give a Status, never a crash, and
// every accepted tensor must lie inside the input buffer.
#include <cstddef>
#include <cstdint>
#include <string>

#include "worker/model/config.h"
#include "worker/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using spear::model::SafetensorsFile;
  auto f = SafetensorsFile::FromBuffer(data, size, "fuzz.safetensors");
  if (f.ok()) {
    unsigned sum = 0;
    for (const spear::model::TensorInfo& t : (*f)->tensors()) {
      if (t.nbytes > 0 && (t.data < data || t.data + t.nbytes > data + size)) __builtin_trap();
      // Touch the first and last byte: ASan flags any read outside the input.
      if (t.nbytes > 0) sum += t.data[0] + t.data[t.nbytes - 1];
      if ((*f)->Find(t.name) == nullptr) __builtin_trap();
    }
    for (const auto& [k, v] : (*f)->metadata()) sum += k.size() + v.size();
    volatile unsigned sink = sum;
    (void)sink;
  }
  auto c = spear::model::ConfigFromHfJson(
      std::string(reinterpret_cast<const char*>(data), size));
  if (c.ok()) {
    volatile float x = c->RopeInvFreq().empty() ? 0.f : c->RopeInvFreq()[0];
    (void)x;
  }
  return 0;
}
