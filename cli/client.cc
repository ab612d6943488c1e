// spear client: talks to a router's public API. Streams (default) or waits
// for the whole answer (--unary); --tokenize and --list-models for the other
// RPCs. The answer goes to stdout, a one-line summary to stderr.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/serve.h"
#include "grpcpp/grpcpp.h"
#include "spear/v1/generation.grpc.pb.h"

namespace spear::cli {
namespace {

absl::StatusOr<std::string> Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const char* FinishName(spear::v1::FinishReason r) {
  switch (r) {
    case spear::v1::FINISH_REASON_STOP: return "stop";
    case spear::v1::FINISH_REASON_LENGTH: return "length";
    case spear::v1::FINISH_REASON_CANCELLED: return "cancelled";
    case spear::v1::FINISH_REASON_ERROR: return "error";
    default: return "unspecified";
  }
}

int RpcFail(const grpc::Status& s) {
  std::fprintf(stderr, "spear client: %d %s\n", static_cast<int>(s.error_code()), s.error_message().c_str());
  return 1;
}

}  // namespace

int CmdClient(const std::vector<std::string>& args) {
  Flags f("client");
  f.Declare("target", "", "router address host:port (required)")
      .Declare("model", "", "model name (empty = the cluster's model)")
      .Declare("prompt", "", "prompt text")
      .DeclareBool("chat", "apply the model's chat template to the prompt")
      .Declare("max-tokens", "0", "tokens to generate at most (0 = server default)")
      .Declare("temperature", "0", "0 = greedy")
      .Declare("top-p", "0", "0 = off")
      .Declare("top-k", "0", "0 = off")
      .Declare("seed", "0", "sampling seed")
      .Declare("stop", "", "stop strings, separated by '|'")
      .DeclareBool("ignore-eos", "do not stop at the end-of-sequence token")
      .Declare("quality", "auto", "auto | full-ec | no-ec")
      .Declare("slo-class", "standard", "interactive | standard | batch")
      .Declare("ttft-ms", "0", "explicit TTFT target (0 = the class's)")
      .Declare("itl-ms", "0", "explicit ITL target (0 = the class's)")
      .Declare("request-id", "", "client-chosen request id")
      .DeclareBool("unary", "use Generate instead of GenerateStream")
      .DeclareBool("tokenize", "tokenize --prompt instead of generating")
      .DeclareBool("list-models", "list the served models")
      .Declare("timeout-s", "600", "deadline of the call")
      .Declare("auth-token-file", "", "file with the bearer token")
      .Declare("tls-ca", "", "PEM CA of the router's certificate (enables TLS)")
      .Declare("tls-cert", "", "client certificate (mutual TLS)")
      .Declare("tls-key", "", "client key (mutual TLS)")
      .DeclareBool("quiet", "no summary line on stderr")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("client", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (f.Str("target").empty()) return Fail("client", absl::InvalidArgumentError("--target is required"), true);
  auto max_tokens = f.Int("max-tokens", 0, 1 << 24);
  auto temp = f.Double("temperature", 0, 10);
  auto top_p = f.Double("top-p", 0, 1);
  auto top_k = f.Int("top-k", 0, 1 << 30);
  auto seed = f.Int("seed", 0, INT64_MAX);
  auto ttft = f.Double("ttft-ms", 0, 3.6e6);
  auto itl = f.Double("itl-ms", 0, 3.6e6);
  auto timeout = f.Double("timeout-s", 0.001, 86400);
  for (const absl::Status& s : {max_tokens.status(), temp.status(), top_p.status(), top_k.status(),
                                seed.status(), ttft.status(), itl.status(), timeout.status()}) {
    if (!s.ok()) return Fail("client", s, true);
  }
  spear::v1::GenerateRequest req;
  req.set_model(f.Str("model"));
  const std::string q = f.Str("quality"), c = f.Str("slo-class");
  if (q == "auto") req.set_quality(spear::v1::QUALITY_POLICY_AUTO);
  else if (q == "full-ec") req.set_quality(spear::v1::QUALITY_POLICY_FULL_EC);
  else if (q == "no-ec") req.set_quality(spear::v1::QUALITY_POLICY_NO_EC);
  else return Fail("client", absl::InvalidArgumentError("--quality must be auto, full-ec or no-ec"), true);
  if (c == "interactive") req.set_slo_class(spear::v1::SLO_CLASS_INTERACTIVE);
  else if (c == "standard") req.set_slo_class(spear::v1::SLO_CLASS_STANDARD);
  else if (c == "batch") req.set_slo_class(spear::v1::SLO_CLASS_BATCH);
  else return Fail("client", absl::InvalidArgumentError("--slo-class must be interactive, standard or batch"), true);
  const bool listing = f.Bool("list-models");
  if (!listing && f.Str("prompt").empty()) {
    return Fail("client", absl::InvalidArgumentError("--prompt is required"), true);
  }

  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (f.Has("tls-ca")) {
    grpc::SslCredentialsOptions o;
    auto ca = Slurp(f.Str("tls-ca"));
    if (!ca.ok()) return Fail("client", ca.status(), true);
    o.pem_root_certs = *ca;
    if (f.Has("tls-cert")) {
      auto cert = Slurp(f.Str("tls-cert"));
      auto key = Slurp(f.Str("tls-key"));
      if (!cert.ok() || !key.ok()) return Fail("client", absl::InvalidArgumentError("cannot read --tls-cert/--tls-key"), true);
      o.pem_cert_chain = *cert;
      o.pem_private_key = *key;
    }
    creds = grpc::SslCredentials(o);
  }
  std::string token;
  if (f.Has("auth-token-file")) {
    auto t = Slurp(f.Str("auth-token-file"));
    if (!t.ok()) return Fail("client", t.status(), true);
    token = std::string(absl::StripAsciiWhitespace(*t));
  }
  auto stub = spear::v1::Generation::NewStub(grpc::CreateChannel(f.Str("target"), creds));
  auto prepare = [&](grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(*timeout * 1000)));
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  };

  if (listing) {
    grpc::ClientContext ctx;
    prepare(&ctx);
    spear::v1::ListModelsResponse resp;
    if (grpc::Status s = stub->ListModels(&ctx, {}, &resp); !s.ok()) return RpcFail(s);
    for (const auto& m : resp.models()) {
      std::printf("%s  arch=%s  quantization=\"%s\"  vocab=%d  context=%d  max_tokens=%d  healthy_workers=%d\n",
                  m.name().c_str(), m.architecture().c_str(), m.quantization().c_str(), m.vocab_size(),
                  m.max_context(), m.max_tokens_limit(), m.healthy_workers());
    }
    return 0;
  }
  if (f.Bool("tokenize")) {
    grpc::ClientContext ctx;
    prepare(&ctx);
    spear::v1::TokenizeRequest tr;
    tr.set_model(f.Str("model"));
    tr.set_text(f.Str("prompt"));
    tr.set_add_special_tokens(true);
    spear::v1::TokenizeResponse resp;
    if (grpc::Status s = stub->Tokenize(&ctx, tr, &resp); !s.ok()) return RpcFail(s);
    for (int i = 0; i < resp.ids_size(); ++i) std::printf("%d%s", resp.ids(i), i + 1 < resp.ids_size() ? " " : "\n");
    return 0;
  }

  req.set_prompt(f.Str("prompt"));
  req.set_chat(f.Bool("chat"));
  req.set_request_id(f.Str("request-id"));
  auto* sp = req.mutable_sampling();
  sp->set_max_tokens(static_cast<int32_t>(*max_tokens));
  sp->set_temperature(static_cast<float>(*temp));
  sp->set_top_p(static_cast<float>(*top_p));
  sp->set_top_k(static_cast<int32_t>(*top_k));
  sp->set_seed(static_cast<uint64_t>(*seed));
  sp->set_ignore_eos(f.Bool("ignore-eos"));
  if (f.Has("stop")) {
    for (absl::string_view s : absl::StrSplit(f.Str("stop"), '|', absl::SkipEmpty())) sp->add_stop(std::string(s));
  }
  req.mutable_slo()->set_ttft_seconds(*ttft / 1000);
  req.mutable_slo()->set_itl_seconds(*itl / 1000);

  spear::v1::GenerateStreamResponse last;
  grpc::ClientContext ctx;
  prepare(&ctx);
  if (f.Bool("unary")) {
    spear::v1::GenerateResponse resp;
    if (grpc::Status s = stub->Generate(&ctx, req, &resp); !s.ok()) return RpcFail(s);
    std::printf("%s\n", resp.text().c_str());
    last.set_finish_reason(resp.finish_reason());
    *last.mutable_usage() = resp.usage();
    *last.mutable_timings() = resp.timings();
    last.set_ec_density(resp.ec_density());
    last.set_worker(resp.worker());
  } else {
    auto reader = stub->GenerateStream(&ctx, req);
    spear::v1::GenerateStreamResponse chunk;
    while (reader->Read(&chunk)) {
      std::fputs(chunk.text().c_str(), stdout);
      std::fflush(stdout);
      if (chunk.finish_reason() != spear::v1::FINISH_REASON_UNSPECIFIED) last = chunk;
    }
    std::printf("\n");
    std::fflush(stdout);
    if (grpc::Status s = reader->Finish(); !s.ok()) return RpcFail(s);
  }
  if (!f.Bool("quiet")) {
    const auto& t = last.timings();
    std::fprintf(stderr,
                 "[%d prompt tokens, %d generated, finish %s; ttft %.3f s, mean itl %.1f ms (max %.1f), "
                 "%.1f tok/s, e2e %.2f s, EC density %.2f, %s]\n",
                 last.usage().prompt_tokens(), last.usage().completion_tokens(),
                 FinishName(last.finish_reason()), t.ttft_seconds(), t.mean_itl_seconds() * 1000,
                 t.max_itl_seconds() * 1000,
                 t.mean_itl_seconds() > 0 ? 1.0 / t.mean_itl_seconds() : 0.0, t.e2e_seconds(),
                 last.ec_density(), last.worker().c_str());
  }
  return 0;
}

}  // namespace spear::cli
