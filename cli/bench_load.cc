// spear bench load: open-loop load. Arrivals are a Poisson process at
// --rate requests/s for --duration-s; prompt and output lengths are drawn
// uniformly from ranges; every request streams (router GenerateStream, or
// Worker.Execute with --worker). Reports throughput, TTFT / ITL / e2e
// percentiles, SLO attainment and rejections by status code.
//
// --direct W sends every odd request of the same schedule straight to
// worker W (interleaved A/B in one run) and reports the router's
// added latency (p50/p99 TTFT and e2e, differences and ratios). For a fair
// number the router should route to W only.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/serve.h"
#include "router/service/request_call.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "spear/v1/generation.grpc.pb.h"
#include "spear/v1/worker.grpc.pb.h"

namespace spear::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Planned {
  double at = 0;  // seconds after the start
  std::vector<int32_t> prompt;
  int32_t max_tokens = 0;
};

struct Outcome {
  double start = 0, first = -1, end = 0;
  std::vector<double> itls;
  int32_t tokens = 0;
  grpc::StatusCode code = grpc::OK;
  double ec_density = 0;
};

struct Shared {
  std::mutex mu;
  std::condition_variable cv;
  int outstanding = 0;
  Clock::time_point t0;
  double Now() const { return std::chrono::duration<double>(Clock::now() - t0).count(); }
};

template <class Resp>
class LoadCall : public grpc::ClientReadReactor<Resp> {
 public:
  LoadCall(Shared* sh, Outcome* out) : sh_(sh), out_(out) {}
  grpc::ClientContext ctx;
  void Begin() {
    out_->start = sh_->Now();
    this->StartRead(&resp_);
    this->StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    const double now = sh_->Now();
    int n = 0;
    double dens = -1;
    if constexpr (std::is_same_v<Resp, spear::v1::GenerateStreamResponse>) {
      n = resp_.token_ids_size();
      if (resp_.finish_reason() != spear::v1::FINISH_REASON_UNSPECIFIED) dens = resp_.ec_density();
    } else {
      if (resp_.has_tokens()) n = resp_.tokens().ids_size();
      if (resp_.has_finished()) dens = resp_.finished().ec_density();
    }
    if (dens >= 0) out_->ec_density = dens;
    if (n > 0) {
      if (out_->first < 0) {
        out_->first = now;
      } else {
        for (int i = 0; i < n; ++i) out_->itls.push_back((now - last_) / n);
      }
      last_ = now;
      out_->tokens += n;
    }
    this->StartRead(&resp_);
  }
  void OnDone(const grpc::Status& s) override {
    out_->end = sh_->Now();
    out_->code = s.error_code();
    {
      std::lock_guard<std::mutex> l(sh_->mu);
      sh_->outstanding -= 1;
    }
    sh_->cv.notify_all();
    delete this;
  }

 private:
  Shared* sh_;
  Outcome* out_;
  Resp resp_;
  double last_ = 0;
};

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double idx = p / 100 * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(idx)), hi = static_cast<size_t>(std::ceil(idx));
  return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

absl::Status ParseRange(const std::string& s, int32_t* lo, int32_t* hi, const char* name) {
  std::vector<std::string> p = absl::StrSplit(s, ':');
  if (p.size() == 1) p.push_back(p[0]);
  if (p.size() != 2 || !absl::SimpleAtoi(p[0], lo) || !absl::SimpleAtoi(p[1], hi) || *lo < 1 || *hi < *lo) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be N or MIN:MAX with 1 <= MIN <= MAX, got '", s, "'"));
  }
  return absl::OkStatus();
}

struct RunConfig {
  std::string target;
  bool worker = false;
  std::string token;
  double ttft_target = 0, itl_target = 0;
  spear::v1::SloClass slo_class = spear::v1::SLO_CLASS_STANDARD;
  spear::v1::QualityPolicy quality = spear::v1::QUALITY_POLICY_AUTO;
  double timeout_s = 600;
};

// Runs the plan against rc; with `direct`, every odd request goes straight
// to that worker instead (interleaved A/B: both halves see the same
// background load, which on a shared machine matters more than anything).
std::vector<Outcome> Run(const RunConfig& rc, const std::vector<Planned>& plan,
                         const RunConfig* direct = nullptr) {
  auto channel = grpc::CreateChannel(rc.target, grpc::InsecureChannelCredentials());
  channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto gen = spear::v1::Generation::NewStub(channel);
  auto wrk = spear::v1::Worker::NewStub(channel);
  std::shared_ptr<grpc::Channel> dchannel;
  std::unique_ptr<spear::v1::Worker::Stub> dwrk;
  if (direct) {
    dchannel = grpc::CreateChannel(direct->target, grpc::InsecureChannelCredentials());
    dchannel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10));
    dwrk = spear::v1::Worker::NewStub(dchannel);
  }
  std::vector<Outcome> out(plan.size());
  // Requests outlive their calls: all are kept until every call is done.
  std::vector<spear::v1::ExecuteRequest> wreqs(plan.size());
  std::vector<spear::v1::GenerateRequest> greqs(plan.size());
  Shared sh;
  sh.t0 = Clock::now();
  for (size_t i = 0; i < plan.size(); ++i) {
    std::this_thread::sleep_until(sh.t0 + std::chrono::microseconds(static_cast<int64_t>(plan[i].at * 1e6)));
    {
      std::lock_guard<std::mutex> l(sh.mu);
      sh.outstanding += 1;
    }
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(rc.timeout_s * 1000));
    const std::string id = absl::StrCat("bench-", i);
    const bool to_direct = direct != nullptr && i % 2 == 1;
    if (rc.worker || to_direct) {
      auto* call = new LoadCall<spear::v1::ExecuteEvent>(&sh, &out[i]);
      call->ctx.set_deadline(deadline);
      spear::v1::ExecuteRequest* req = &wreqs[i];
      req->set_request_id(id);
      req->mutable_prompt_tokens()->Assign(plan[i].prompt.begin(), plan[i].prompt.end());
      req->mutable_sampling()->set_max_tokens(plan[i].max_tokens);
      req->mutable_sampling()->set_ignore_eos(true);
      req->mutable_slo()->set_ttft_seconds(rc.ttft_target);
      req->mutable_slo()->set_itl_seconds(rc.itl_target);
      req->set_quality(rc.quality);
      req->set_max_ec_density(rc.quality == spear::v1::QUALITY_POLICY_NO_EC ? 0 : 1);
      (to_direct ? dwrk.get() : wrk.get())->async()->Execute(&call->ctx, req, call);
      call->Begin();
    } else {
      auto* call = new LoadCall<spear::v1::GenerateStreamResponse>(&sh, &out[i]);
      call->ctx.set_deadline(deadline);
      if (!rc.token.empty()) call->ctx.AddMetadata("authorization", "Bearer " + rc.token);
      spear::v1::GenerateRequest* req = &greqs[i];
      req->set_request_id(id);
      req->mutable_prompt_tokens()->mutable_ids()->Assign(plan[i].prompt.begin(), plan[i].prompt.end());
      req->mutable_sampling()->set_max_tokens(plan[i].max_tokens);
      req->mutable_sampling()->set_ignore_eos(true);
      req->set_slo_class(rc.slo_class);
      req->mutable_slo()->set_ttft_seconds(rc.ttft_target);
      req->mutable_slo()->set_itl_seconds(rc.itl_target);
      req->set_quality(rc.quality);
      gen->async()->GenerateStream(&call->ctx, req, call);
      call->Begin();
    }
  }
  std::unique_lock<std::mutex> l(sh.mu);
  sh.cv.wait(l, [&] { return sh.outstanding == 0; });
  return out;
}

nlohmann::json Summarize(const char* label, const std::vector<Outcome>& out, double duration,
                         double ttft_target, double itl_target, bool print) {
  std::vector<double> ttft, itl, e2e;
  std::map<std::string, int> codes;  // by status code name
  int ok = 0, met = 0;
  int64_t tokens = 0;
  double last_end = 0, dens = 0;
  for (const Outcome& o : out) {
    codes[router::CodeName(o.code)] += 1;
    if (o.code != grpc::OK) continue;
    ++ok;
    tokens += o.tokens;
    dens += o.ec_density;
    last_end = std::max(last_end, o.end);
    if (o.first >= 0) ttft.push_back(o.first - o.start);
    e2e.push_back(o.end - o.start);
    itl.insert(itl.end(), o.itls.begin(), o.itls.end());
    const double max_itl = o.itls.empty() ? 0 : *std::max_element(o.itls.begin(), o.itls.end());
    if ((ttft_target <= 0 || (o.first >= 0 && o.first - o.start <= ttft_target)) &&
        (itl_target <= 0 || max_itl <= itl_target)) {
      ++met;
    }
  }
  const double span = std::max(duration, last_end);
  nlohmann::json j = {
      {"label", label}, {"sent", out.size()}, {"ok", ok},
      {"requests_per_second", ok / span}, {"tokens_per_second", tokens / span},
      {"ttft_p50", Pct(ttft, 50)}, {"ttft_p90", Pct(ttft, 90)}, {"ttft_p99", Pct(ttft, 99)},
      {"itl_p50", Pct(itl, 50)}, {"itl_p90", Pct(itl, 90)}, {"itl_p99", Pct(itl, 99)},
      {"e2e_p50", Pct(e2e, 50)}, {"e2e_p99", Pct(e2e, 99)},
      {"slo_attainment_of_ok", ok ? static_cast<double>(met) / ok : 0.0},
      {"slo_attainment_of_sent", out.empty() ? 0.0 : static_cast<double>(met) / out.size()},
      {"mean_ec_density", ok ? dens / ok : 0.0}};
  j["codes"] = codes;
  j["rejected"] = codes.count("RESOURCE_EXHAUSTED") ? codes["RESOURCE_EXHAUSTED"] : 0;
  if (print) {
    std::printf("== %s: %zu sent, %d ok, %d RESOURCE_EXHAUSTED, other errors %zu\n", label, out.size(), ok,
                j["rejected"].get<int>(), out.size() - ok - j["rejected"].get<int>());
    std::printf("   throughput %.2f req/s, %.1f tok/s\n", ok / span, tokens / span);
    std::printf("   TTFT  p50 %7.1f  p90 %7.1f  p99 %7.1f ms\n", Pct(ttft, 50) * 1e3, Pct(ttft, 90) * 1e3, Pct(ttft, 99) * 1e3);
    std::printf("   ITL   p50 %7.1f  p90 %7.1f  p99 %7.1f ms\n", Pct(itl, 50) * 1e3, Pct(itl, 90) * 1e3, Pct(itl, 99) * 1e3);
    std::printf("   e2e   p50 %7.1f  p99 %7.1f ms\n", Pct(e2e, 50) * 1e3, Pct(e2e, 99) * 1e3);
    std::printf("   SLO (TTFT <= %.0f ms, every ITL <= %.0f ms): %.1f%% of completed, %.1f%% of sent; mean EC density %.2f\n",
                ttft_target * 1e3, itl_target * 1e3, j["slo_attainment_of_ok"].get<double>() * 100,
                j["slo_attainment_of_sent"].get<double>() * 100, j["mean_ec_density"].get<double>());
    std::printf("   status codes:");
    for (const auto& [code, n] : codes) std::printf(" %s=%d", code.c_str(), n);
    std::printf("\n");
  }
  return j;
}

}  // namespace

int CmdBenchLoad(const std::vector<std::string>& args) {
  Flags f("bench load");
  f.Declare("target", "", "router host:port (or a worker with --worker)")
      .DeclareBool("worker", "--target is a spear-worker (Worker.Execute with token ids)")
      .Declare("direct", "", "send every odd request straight to this worker and report the router's overhead")
      .Declare("rate", "1", "mean arrivals per second (Poisson)")
      .Declare("duration-s", "30", "arrival window")
      .Declare("prompt-tokens", "32:256", "prompt length N or MIN:MAX (uniform)")
      .Declare("output-tokens", "16:128", "output length N or MIN:MAX (uniform; EOS ignored)")
      .Declare("vocab", "0", "token ids drawn from [100, vocab); 0 = ask ListModels / Stats")
      .Declare("slo-class", "standard", "interactive | standard | batch")
      .Declare("ttft-ms", "0", "TTFT target sent with each request and used for attainment")
      .Declare("itl-ms", "0", "ITL target sent with each request and used for attainment")
      .Declare("quality", "auto", "auto | full-ec | no-ec")
      .Declare("seed", "1", "schedule seed")
      .Declare("timeout-s", "600", "deadline per request")
      .Declare("auth-token-file", "", "bearer token file (router)")
      .DeclareBool("json", "print one JSON object")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("bench load", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (f.Str("target").empty()) return Fail("bench load", absl::InvalidArgumentError("--target is required"), true);
  auto rate = f.Double("rate", 1e-3, 1e5);
  auto duration = f.Double("duration-s", 0.1, 86400);
  auto vocab = f.Int("vocab", 0, 1 << 30);
  auto seed = f.Int("seed", 0, INT64_MAX);
  auto ttft = f.Double("ttft-ms", 0, 3.6e6);
  auto itl = f.Double("itl-ms", 0, 3.6e6);
  auto timeout = f.Double("timeout-s", 0.01, 86400);
  for (const absl::Status& s : {rate.status(), duration.status(), vocab.status(), seed.status(),
                                ttft.status(), itl.status(), timeout.status()}) {
    if (!s.ok()) return Fail("bench load", s, true);
  }
  int32_t plo, phi, olo, ohi;
  if (absl::Status s = ParseRange(f.Str("prompt-tokens"), &plo, &phi, "prompt-tokens"); !s.ok()) return Fail("bench load", s, true);
  if (absl::Status s = ParseRange(f.Str("output-tokens"), &olo, &ohi, "output-tokens"); !s.ok()) return Fail("bench load", s, true);
  RunConfig rc;
  rc.target = f.Str("target");
  rc.worker = f.Bool("worker");
  rc.ttft_target = *ttft / 1000;
  rc.itl_target = *itl / 1000;
  rc.timeout_s = *timeout;
  const std::string cls = f.Str("slo-class"), q = f.Str("quality");
  if (cls == "interactive") rc.slo_class = spear::v1::SLO_CLASS_INTERACTIVE;
  else if (cls == "batch") rc.slo_class = spear::v1::SLO_CLASS_BATCH;
  else if (cls != "standard") return Fail("bench load", absl::InvalidArgumentError("bad --slo-class"), true);
  if (q == "full-ec") rc.quality = spear::v1::QUALITY_POLICY_FULL_EC;
  else if (q == "no-ec") rc.quality = spear::v1::QUALITY_POLICY_NO_EC;
  else if (q != "auto") return Fail("bench load", absl::InvalidArgumentError("bad --quality"), true);
  if (f.Has("auth-token-file")) {
    std::ifstream in(f.Str("auth-token-file"));
    std::stringstream ss;
    ss << in.rdbuf();
    rc.token = std::string(absl::StripAsciiWhitespace(ss.str()));
  }

  // Vocabulary size for random prompts.
  int64_t v = *vocab;
  if (v == 0) {
    auto ch = grpc::CreateChannel(rc.target, grpc::InsecureChannelCredentials());
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (rc.worker) {
      spear::v1::StatsResponse s;
      if (auto st = spear::v1::Worker::NewStub(ch)->Stats(&ctx, {}, &s); st.ok()) v = s.vocab_size();
    } else {
      if (!rc.token.empty()) ctx.AddMetadata("authorization", "Bearer " + rc.token);
      spear::v1::ListModelsResponse lm;
      if (auto st = spear::v1::Generation::NewStub(ch)->ListModels(&ctx, {}, &lm); st.ok() && lm.models_size()) {
        v = lm.models(0).vocab_size();
      }
    }
    if (v <= 100) return Fail("bench load", absl::UnavailableError("cannot learn the vocabulary size from the target; give --vocab"));
  }

  std::mt19937_64 rng(static_cast<uint64_t>(*seed));
  std::exponential_distribution<double> gap(*rate);
  std::uniform_int_distribution<int32_t> plen(plo, phi), olen(olo, ohi);
  std::uniform_int_distribution<int32_t> tok(100, static_cast<int32_t>(v - 1));
  std::vector<Planned> plan;
  for (double t = gap(rng); t < *duration; t += gap(rng)) {
    Planned p;
    p.at = t;
    p.prompt.resize(plen(rng));
    for (auto& id : p.prompt) id = tok(rng);
    p.max_tokens = olen(rng);
    plan.push_back(std::move(p));
  }
  const bool json = f.Bool("json");
  if (!json) {
    std::printf("bench load: %zu requests over %.0f s (Poisson, %.2f/s), prompt %d..%d, output %d..%d tokens, target %s%s\n",
                plan.size(), *duration, *rate, plo, phi, olo, ohi, rc.target.c_str(), rc.worker ? " (worker)" : "");
  }
  if (!f.Has("direct")) {
    const auto out = Run(rc, plan);
    nlohmann::json result =
        Summarize(rc.worker ? "worker" : "router", out, *duration, rc.ttft_target, rc.itl_target, !json);
    if (json) std::printf("%s\n", result.dump().c_str());
    return 0;
  }
  RunConfig d = rc;
  d.target = f.Str("direct");
  d.worker = true;
  const auto all = Run(rc, plan, &d);
  std::vector<Outcome> via_router, direct;
  for (size_t i = 0; i < all.size(); ++i) (i % 2 ? direct : via_router).push_back(all[i]);
  nlohmann::json result = Summarize("router (even requests)", via_router, *duration, rc.ttft_target, rc.itl_target, !json);
  nlohmann::json dj = Summarize("direct worker (odd requests)", direct, *duration, rc.ttft_target, rc.itl_target, !json);
  {
    nlohmann::json ov;
    for (const char* k : {"ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"}) {
      const double a = result[k].get<double>(), b = dj[k].get<double>();
      ov[std::string(k) + "_added_ms"] = (a - b) * 1e3;
      ov[std::string(k) + "_ratio"] = b > 0 ? a / b : NAN;
    }
    if (!json) {
      std::printf("== router overhead (router - direct, interleaved in one run): TTFT p50 %+.2f ms (x%.3f), p99 %+.2f ms (x%.3f); e2e p50 %+.2f ms (x%.3f), p99 %+.2f ms (x%.3f)\n",
                  ov["ttft_p50_added_ms"].get<double>(), ov["ttft_p50_ratio"].get<double>(),
                  ov["ttft_p99_added_ms"].get<double>(), ov["ttft_p99_ratio"].get<double>(),
                  ov["e2e_p50_added_ms"].get<double>(), ov["e2e_p50_ratio"].get<double>(),
                  ov["e2e_p99_added_ms"].get<double>(), ov["e2e_p99_ratio"].get<double>());
    }
    result = {{"router", result}, {"direct", dj}, {"overhead", ov}};
  }
  if (json) std::printf("%s\n", result.dump().c_str());
  return 0;
}

}  // namespace spear::cli
