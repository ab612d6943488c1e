// libFuzzer target: GGUF parsing, typed metadata getters, config extraction
// and dequantization of every tensor (bounded to 1M elements so a valid but
// large tensor cannot exhaust memory).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "worker/model/config.h"
#include "worker/model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using spear::model::GgufFile;
  auto f = GgufFile::FromBuffer(data, size, "fuzz.gguf");
  if (!f.ok()) return 0;
  const GgufFile& g = **f;
  for (const auto& [key, value] : g.metadata()) {
    (void)g.GetString(key);
    (void)g.GetInt(key);
    (void)g.GetFloat(key);
    (void)g.GetBool(key);
    (void)g.GetStringArray(key);
    (void)g.GetIntArray(key);
    (void)g.GetFloatArray(key);
  }
  auto c = spear::model::ConfigFromGguf(g);
  if (c.ok()) (void)c->RopeInvFreq();
  std::vector<float> out;
  for (const spear::model::TensorInfo& t : g.tensors()) {
    if (t.nbytes > 0 && (t.data < data || t.data + t.nbytes > data + size)) __builtin_trap();
    if (g.Find(t.name) == nullptr) __builtin_trap();
    if (!spear::model::CanDequantize(t.type) || t.numel() > (1 << 20)) continue;
    out.assign(static_cast<size_t>(t.numel()), 0.f);
    if (!spear::model::Dequantize(t, out.data()).ok()) __builtin_trap();
  }
  return 0;
}
