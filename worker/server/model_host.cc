#include "worker/server/model_host.h"

#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/engine/engine_factory.h"
#include "worker/model/model_cache.h"
#include "worker/model/w4_linear.h"

namespace spear::server {
namespace {

std::string Describe(model::LoadedModel* m) {
  int64_t total = 0, w4 = 0, ec = 0, bytes = 0, ec_bytes = 0;
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    ++total;
    bytes += l->weight_bytes();
    if (auto* q = dynamic_cast<model::W4Linear*>(l.get())) {
      ++w4;
      if (q->has_ec()) {
        ++ec;
        ec_bytes += q->ec_bytes();
      }
    }
  });
  if (w4 == 0) return "none (dense weights)";
  std::string s = absl::StrCat("w4 ", w4, "/", total, " modules");
  if (ec > 0) {
    absl::StrAppend(&s, absl::StrFormat(" + ec on %d modules (%.2f%% of linear bytes)", ec,
                                        100.0 * ec_bytes / std::max<int64_t>(1, bytes - ec_bytes)));
  }
  return s;
}

}  // namespace

absl::StatusOr<ModelHost> OpenModelHost(const HostOptions& o) {
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.kv_tokens < 1 || o.block_size < 1 || o.max_batch_tokens < 1) {
    return absl::InvalidArgumentError("kv_tokens, block_size and max_batch_tokens must be >= 1");
  }
  if (auto d = engine::ResolveDevice(o.device); !d.ok()) return d.status();
  auto path = model::ResolveModel(o.model);
  if (!path.ok()) return path.status();
  ModelHost h;
  const auto t0 = std::chrono::steady_clock::now();
  auto loaded = model::LoadModel(*path);
  if (!loaded.ok()) return loaded.status();
  h.model = std::move(*loaded);
  h.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  engine::EngineOptions eo;
  eo.num_threads = o.threads;
  eo.max_batch_tokens = o.max_batch_tokens;
  eo.kv_cache.block_size = o.block_size;
  eo.kv_cache.num_blocks = (o.kv_tokens + o.block_size - 1) / o.block_size;
  auto eng = engine::CreateEngine(h.model.get(), eo, o.device);
  if (!eng.ok()) return eng.status();
  h.engine = std::move(*eng);
  auto ec = engine::EcControl::Create(h.model.get());
  if (!ec.ok()) return ec.status();
  h.ec = std::move(*ec);
  std::filesystem::path p(*path);
  h.name = o.model.find('/') == std::string::npos ? o.model : p.filename().string();
  if (h.name.empty()) h.name = p.parent_path().filename().string();
  h.quantization = Describe(h.model.get());
  return h;
}

}  // namespace spear::server
