#include "worker/server/validate.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace spear::server {
namespace {

absl::Status Bad(const std::string& msg) { return absl::InvalidArgumentError(msg); }

bool Finite(double x) { return std::isfinite(x); }

}  // namespace

absl::StatusOr<engine::ExecuteSpec> ValidateExecute(const v1::ExecuteRequest& req,
                                                    const ModelLimits& lim) {
  engine::ExecuteSpec spec;
  const std::string& id = req.request_id();
  if (id.size() > kMaxRequestIdBytes) {
    return Bad(absl::StrCat("request_id is ", id.size(), " bytes; at most ", kMaxRequestIdBytes));
  }
  for (unsigned char c : id) {
    if (c < 0x20 || c > 0x7e) return Bad("request_id must be printable ASCII");
  }
  spec.spec.request_id = id;

  const int64_t n = req.prompt_tokens_size();
  if (n == 0) return Bad("prompt_tokens is empty");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = req.prompt_tokens(static_cast<int>(i));
    if (t < 0 || t >= lim.vocab_size) {
      return Bad(absl::StrCat("prompt_tokens[", i, "] = ", t, " is outside the vocabulary [0, ",
                              lim.vocab_size, ")"));
    }
  }
  spec.prompt.assign(req.prompt_tokens().begin(), req.prompt_tokens().end());
  if (lim.max_context > 0 && n >= lim.max_context) {
    return Bad(absl::StrCat("prompt has ", n, " tokens; the model's context is ",
                            lim.max_context, " (prompt must be shorter to generate)"));
  }

  const v1::SamplingParams& s = req.sampling();
  if (s.max_tokens() < 0) {
    return Bad(absl::StrCat("sampling.max_tokens = ", s.max_tokens(), " must be >= 0"));
  }
  int64_t max_new = s.max_tokens();
  if (max_new == 0) {
    max_new = lim.default_max_tokens;
    if (lim.max_context > 0) max_new = std::min<int64_t>(max_new, lim.max_context - n);
  }
  if (lim.max_context > 0 && n + max_new > lim.max_context) {
    return Bad(absl::StrCat("prompt (", n, " tokens) + max_tokens (", max_new,
                            ") exceeds the context length ", lim.max_context));
  }
  if (lim.kv_capacity_tokens > 0 && n + max_new > lim.kv_capacity_tokens) {
    return Bad(absl::StrCat("prompt (", n, " tokens) + max_tokens (", max_new,
                            ") exceeds this worker's KV cache (", lim.kv_capacity_tokens,
                            " tokens)"));
  }
  if (!Finite(s.temperature()) || s.temperature() < 0 || s.temperature() > 10) {
    return Bad(absl::StrCat("sampling.temperature = ", s.temperature(), " must be in [0, 10]"));
  }
  if (!Finite(s.top_p()) || s.top_p() < 0 || s.top_p() > 1) {
    return Bad(absl::StrCat("sampling.top_p = ", s.top_p(), " must be in [0, 1]"));
  }
  if (s.top_k() < 0 || s.top_k() > lim.vocab_size) {
    return Bad(absl::StrCat("sampling.top_k = ", s.top_k(), " must be in [0, ", lim.vocab_size,
                            "]"));
  }
  if (s.stop_size() > kMaxStopStrings) {
    return Bad(absl::StrCat("sampling.stop has ", s.stop_size(), " strings; at most ",
                            kMaxStopStrings));
  }
  for (const std::string& st : s.stop()) {
    if (st.empty() || st.size() > kMaxStopBytes) {
      return Bad(absl::StrCat("each sampling.stop string must be 1..", kMaxStopBytes, " bytes"));
    }
  }
  spec.sampling.temperature = s.temperature();
  spec.sampling.top_k = s.top_k();
  spec.sampling.top_p = s.top_p() == 0 ? 1.f : s.top_p();
  spec.sampling.seed = s.seed();
  if (absl::Status st = spec.sampling.Validate(); !st.ok()) return Bad(std::string(st.message()));
  spec.options.max_new_tokens = max_new;
  spec.options.stop_on_eos = !s.ignore_eos();

  const v1::SloTargets& slo = req.slo();
  if (!Finite(slo.ttft_seconds()) || slo.ttft_seconds() < 0 || !Finite(slo.itl_seconds()) ||
      slo.itl_seconds() < 0) {
    return Bad("slo.ttft_seconds and slo.itl_seconds must be finite and >= 0");
  }
  spec.spec.itl_slo = slo.itl_seconds();
  spec.spec.ttft_slo = slo.ttft_seconds();
  switch (req.quality()) {
    case v1::QUALITY_POLICY_UNSPECIFIED:
    case v1::QUALITY_POLICY_AUTO: spec.spec.quality = engine::QualityPolicy::kAuto; break;
    case v1::QUALITY_POLICY_FULL_EC: spec.spec.quality = engine::QualityPolicy::kFullEc; break;
    case v1::QUALITY_POLICY_NO_EC: spec.spec.quality = engine::QualityPolicy::kNoEc; break;
    default: return Bad(absl::StrCat("quality = ", static_cast<int>(req.quality()),
                                     " is not a QualityPolicy"));
  }
  const double cap = req.max_ec_density();
  if (!Finite(cap) || cap < 0 || cap > 1) {
    return Bad(absl::StrCat("max_ec_density = ", cap, " must be in [0, 1] (0 = unset = 1)"));
  }
  spec.spec.max_ec_density = cap == 0 ? 1.0 : cap;
  if (!Finite(req.arrival_unix_seconds()) || req.arrival_unix_seconds() < 0) {
    return Bad("arrival_unix_seconds must be finite and >= 0");
  }
  return spec;
}

}  // namespace spear::server
