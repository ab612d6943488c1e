#include "router/service/model_frontend.h"

#include <cmath>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "worker/model/gguf.h"
#include "worker/model/model_cache.h"

namespace spear::router {
namespace fs = std::filesystem;
namespace {

constexpr int kMaxStops = 16;
constexpr size_t kMaxStopBytes = 256;
constexpr size_t kMaxRequestIdBytes = 128;
constexpr size_t kMaxPromptBytes = 1 << 20;
constexpr double kMaxTemperature = 10;

absl::StatusOr<std::unique_ptr<model::Tokenizer>> LoadTokenizerFor(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const fs::path tj = fs::path(path) / "tokenizer.json";
    if (fs::exists(tj, ec)) return model::LoadHfTokenizer(tj.string());
    return std::unique_ptr<model::Tokenizer>();  // ids-only model
  }
  auto gguf = model::GgufFile::Open(path);
  if (!gguf.ok()) return gguf.status();
  if ((*gguf)->Get("tokenizer.ggml.model") == nullptr) return std::unique_ptr<model::Tokenizer>();
  return model::TokenizerFromGguf(**gguf);
}

std::string NewRequestId() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return absl::StrFormat("req-%016x", rng());
}

bool Finite(double x) { return std::isfinite(x); }

}  // namespace

namespace {

// Length of the valid UTF-8 character at s[i], or 0 if there is none.
size_t Utf8CharLen(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  int n;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) {
    n = 1, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 2, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 3, cp = c & 0x07;
  } else {
    return 0;
  }
  for (int k = 1; k <= n; ++k) {
    if (i + k >= s.size()) return 0;
    const unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
      cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return static_cast<size_t>(n) + 1;
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = Utf8CharLen(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string SanitizeUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = Utf8CharLen(s, i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ModelFrontend>> ModelFrontend::Load(FrontendOptions opts) {
  if (opts.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (opts.default_max_tokens < 1 || opts.max_tokens_limit < opts.default_max_tokens) {
    return absl::InvalidArgumentError("need 1 <= default max tokens <= max tokens limit");
  }
  auto path = model::ResolveModel(opts.model);
  if (!path.ok()) return path.status();
  auto tok = LoadTokenizerFor(*path);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat("loading the tokenizer of ", *path, ": ", tok.status().message()));
  }
  std::unique_ptr<ModelFrontend> f(new ModelFrontend(std::move(opts)));
  f->tok_ = std::move(*tok);
  // Same rule as spear-worker's model label (worker/server/model_host.cc),
  // so router and worker series share `model`.
  if (!f->opts_.model_name.empty()) {
    f->name_ = f->opts_.model_name;
  } else if (f->opts_.model.find('/') == std::string::npos) {
    f->name_ = f->opts_.model;  // a cache name or a file in the working directory
  } else {
    const fs::path p(f->opts_.model);
    f->name_ = p.filename().string();
    if (f->name_.empty()) f->name_ = p.parent_path().filename().string();
  }
  return f;
}

absl::Status ModelFrontend::CheckModel(const std::string& requested,
                                       const std::string& worker_model) const {
  if (requested.empty() || requested == name_ || requested == opts_.model ||
      (!worker_model.empty() && requested == worker_model)) {
    return absl::OkStatus();
  }
  return absl::NotFoundError(absl::StrCat("unknown model '", requested, "'; this cluster serves '",
                                          name_, "' (see ListModels)"));
}

absl::StatusOr<PreparedRequest> ModelFrontend::Prepare(const spear::v1::GenerateRequest& req,
                                                       int64_t vocab_size,
                                                       int64_t max_context) const {
  using absl::InvalidArgumentError;
  using absl::StrCat;
  PreparedRequest out;
  if (vocab_size <= 0 && tok_) vocab_size = tok_->vocab_size();
  if (max_context <= 0) max_context = opts_.max_context;

  // request id
  if (req.request_id().size() > kMaxRequestIdBytes) {
    return InvalidArgumentError(StrCat("request_id is ", req.request_id().size(),
                                       " bytes; at most ", kMaxRequestIdBytes));
  }
  for (char c : req.request_id()) {
    if (c < 0x20 || c > 0x7E) return InvalidArgumentError("request_id must be printable ASCII");
  }
  out.request_id = req.request_id().empty() ? NewRequestId() : req.request_id();

  // enums
  if (!spear::v1::SloClass_IsValid(req.slo_class())) {
    return InvalidArgumentError(StrCat("slo_class ", req.slo_class(), " is not a known SloClass"));
  }
  if (!spear::v1::QualityPolicy_IsValid(req.quality())) {
    return InvalidArgumentError(StrCat("quality ", req.quality(), " is not a known QualityPolicy"));
  }
  out.quality = req.quality() == spear::v1::QUALITY_POLICY_UNSPECIFIED ? spear::v1::QUALITY_POLICY_AUTO
                                                                       : req.quality();

  // sampling
  const spear::v1::SamplingParams& s = req.sampling();
  if (s.max_tokens() < 0 || s.max_tokens() > opts_.max_tokens_limit) {
    return InvalidArgumentError(StrCat("sampling.max_tokens must be in [0, ",
                                       opts_.max_tokens_limit, "], got ", s.max_tokens()));
  }
  if (!Finite(s.temperature()) || s.temperature() < 0 || s.temperature() > kMaxTemperature) {
    return InvalidArgumentError(StrCat("sampling.temperature must be in [0, ", kMaxTemperature,
                                       "], got ", s.temperature()));
  }
  if (!Finite(s.top_p()) || s.top_p() < 0 || s.top_p() > 1) {
    return InvalidArgumentError(StrCat("sampling.top_p must be in [0, 1], got ", s.top_p()));
  }
  if (s.top_k() < 0 || (vocab_size > 0 && s.top_k() > vocab_size)) {
    return InvalidArgumentError(StrCat("sampling.top_k must be in [0, ", vocab_size, "], got ",
                                       s.top_k()));
  }
  if (s.stop_size() > kMaxStops) {
    return InvalidArgumentError(StrCat("at most ", kMaxStops, " stop strings, got ", s.stop_size()));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string& st = s.stop(i);
    if (st.empty() || st.size() > kMaxStopBytes) {
      return InvalidArgumentError(StrCat("sampling.stop[", i, "] must be 1..", kMaxStopBytes,
                                         " bytes, got ", st.size()));
    }
    if (!IsValidUtf8(st)) return InvalidArgumentError(StrCat("sampling.stop[", i, "] is not UTF-8"));
    out.stop.push_back(st);
  }
  if (!out.stop.empty() && !tok_) {
    return InvalidArgumentError("stop strings need a model with a tokenizer");
  }
  out.sampling = s;
  out.sampling.clear_stop();
  if (out.sampling.max_tokens() == 0) out.sampling.set_max_tokens(opts_.default_max_tokens);

  // SLO
  const spear::v1::SloTargets& slo = req.slo();
  if (!Finite(slo.ttft_seconds()) || slo.ttft_seconds() < 0 || slo.ttft_seconds() > 3600 ||
      !Finite(slo.itl_seconds()) || slo.itl_seconds() < 0 || slo.itl_seconds() > 3600) {
    return InvalidArgumentError("slo targets must be in [0, 3600] seconds");
  }
  switch (req.slo_class()) {
    case spear::v1::SLO_CLASS_INTERACTIVE:
      out.slo_class = "interactive";
      out.ttft_target = opts_.slo.interactive_ttft, out.itl_target = opts_.slo.interactive_itl;
      break;
    case spear::v1::SLO_CLASS_BATCH:
      out.slo_class = "batch";
      break;
    default:
      out.slo_class = "standard";
      out.ttft_target = opts_.slo.standard_ttft, out.itl_target = opts_.slo.standard_itl;
  }
  if (slo.ttft_seconds() > 0) out.ttft_target = slo.ttft_seconds();
  if (slo.itl_seconds() > 0) out.itl_target = slo.itl_seconds();

  // input
  switch (req.input_case()) {
    case spear::v1::GenerateRequest::kPrompt: {
      const std::string& p = req.prompt();
      if (p.empty()) return InvalidArgumentError("prompt is empty");
      if (p.size() > kMaxPromptBytes) {
        return InvalidArgumentError(StrCat("prompt is ", p.size(), " bytes; at most ", kMaxPromptBytes));
      }
      if (!IsValidUtf8(p)) return InvalidArgumentError("prompt is not valid UTF-8");
      if (!tok_) {
        return InvalidArgumentError("this model has no tokenizer; send prompt_tokens instead of prompt");
      }
      if (req.chat()) {
        auto rendered = model::ApplyChatTemplate(*tok_, {{"user", p}}, /*add_generation_prompt=*/true);
        if (!rendered.ok()) {
          return InvalidArgumentError(StrCat("chat: ", rendered.status().message()));
        }
        out.prompt = tok_->Encode(*rendered, /*add_bos=*/true);
      } else {
        out.prompt = tok_->Encode(p, /*add_bos=*/true);
      }
      if (out.prompt.empty()) return InvalidArgumentError("prompt encodes to no tokens");
      break;
    }
    case spear::v1::GenerateRequest::kPromptTokens: {
      if (req.chat()) return InvalidArgumentError("chat needs a text prompt, not prompt_tokens");
      const auto& ids = req.prompt_tokens().ids();
      if (ids.empty()) return InvalidArgumentError("prompt_tokens is empty");
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || (vocab_size > 0 && ids[i] >= vocab_size)) {
          return InvalidArgumentError(StrCat("prompt_tokens[", i, "] = ", ids[i],
                                             " is not a token id in [0, ", vocab_size, ")"));
        }
      }
      out.prompt.assign(ids.begin(), ids.end());
      break;
    }
    default:
      return InvalidArgumentError("one of prompt or prompt_tokens is required");
  }
  const int64_t need = static_cast<int64_t>(out.prompt.size()) + out.sampling.max_tokens();
  if (need > max_context) {
    return InvalidArgumentError(StrCat("prompt (", out.prompt.size(), " tokens) + max_tokens (",
                                       out.sampling.max_tokens(), ") exceeds the model's context of ",
                                       max_context, " tokens"));
  }
  return out;
}

absl::StatusOr<spear::v1::TokenizeResponse> ModelFrontend::Tokenize(
    const spear::v1::TokenizeRequest& req) const {
  if (absl::Status s = CheckModel(req.model(), ""); !s.ok()) return s;
  if (!tok_) return absl::FailedPreconditionError("this model has no tokenizer");
  if (req.text().size() > kMaxPromptBytes) {
    return absl::InvalidArgumentError(absl::StrCat("text is ", req.text().size(), " bytes; at most ",
                                                   kMaxPromptBytes));
  }
  if (!IsValidUtf8(req.text())) return absl::InvalidArgumentError("text is not valid UTF-8");
  spear::v1::TokenizeResponse out;
  for (int32_t id : tok_->Encode(req.text(), req.add_special_tokens())) {
    out.add_ids(id);
    out.add_pieces(tok_->TokenText(id));
  }
  return out;
}

}  // namespace spear::router
