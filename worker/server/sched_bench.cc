// spear-sched-bench: the SLO-constrained adaptive prefill chunk against a
// static chunk, on the real engine, with one arrival schedule for both.
//
// Workload (open loop, seeded): `--streams` decoding requests start first
// (short prompts, long generations) and keep decoding; then `--long`
// requests with `--long-prompt` token prompts arrive as a Poisson process
// (`--rate` per second) and need prefill while the streams decode. When
// every long request is done the streams are cancelled. The same schedule
// runs twice on the same engine: the adaptive scheduler under an ITL
// target, and a static `--static-chunk` chunk (no SLO search, no shedding).
// Reports, per mode: ITL p50/p99/max over every streamed token, the share
// of ITLs within the target, TTFT of the long requests (mean/p50/max),
// mean EC density, shed iterations; then the ratios.
//
//   spear-sched-bench --model smollm2-135m [--threads 2] [--itl-slo-ms 0 (auto)]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "cli/flags.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "worker/engine/engine_loop.h"
#include "worker/server/model_host.h"

namespace {

using spear::engine::Clock;
using spear::engine::EngineLoop;
using spear::engine::ExecuteSpec;
using spear::engine::FinishInfo;
using spear::engine::RequestSink;

class Recorder final : public RequestSink {
 public:
  explicit Recorder(const Clock* clock) : clock_(clock) {}
  void OnAccepted(double, int64_t) override {}
  void OnTokens(const std::vector<int32_t>& ids, double density) override {
    absl::MutexLock l(&mu_);
    for (size_t i = 0; i < ids.size(); ++i) times_.push_back(clock_->Now());
    density_sum_ += density * ids.size();
  }
  void OnFinished(const FinishInfo& f) override {
    {
      absl::MutexLock l(&mu_);
      info_ = f;
    }
    done_.Notify();
  }
  std::vector<double> times() const {
    absl::MutexLock l(&mu_);
    return times_;
  }
  double density_sum() const {
    absl::MutexLock l(&mu_);
    return density_sum_;
  }
  absl::Notification& done() { return done_; }
  double submitted = 0;

 private:
  const Clock* clock_;
  mutable absl::Mutex mu_;
  std::vector<double> times_;
  double density_sum_ = 0;
  FinishInfo info_;
  absl::Notification done_;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(idx));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (idx - lo) * (v[hi] - v[lo]);
}

// Latency-table health and chunk sizes, per iteration (loop thread).
class Observer final : public spear::engine::LoopObserver {
 public:
  void OnIteration(const spear::engine::IterationStats& it,
                   const spear::engine::LoopSnapshot&) override {
    if (it.predicted_seconds > 0 && it.decode_tokens > 0) {
      ratio.push_back(it.seconds / it.predicted_seconds);
    }
    if (it.prefill_tokens > 0 && it.decode_tokens > 0) chunk.push_back(it.prefill_tokens);
    if (trace != nullptr) {
      std::fprintf(trace, "%s,%lld,%lld,%.6f,%.6f,%.3f\n", mode.c_str(),
                   static_cast<long long>(it.decode_tokens),
                   static_cast<long long>(it.prefill_tokens), it.predicted_seconds, it.seconds,
                   it.ec_density);
    }
  }
  std::FILE* trace = nullptr;  // --trace CSV: mode,decodes,prefill,predicted,measured,density
  std::string mode;
  void OnFirstToken(double) override {}
  void OnInterToken(double) override {}
  void OnRequestDone(const FinishInfo&) override {}
  void OnIdle(const spear::engine::LoopSnapshot&) override {}
  std::vector<double> ratio, chunk;
};

struct Arrival {
  double at;  // seconds after start
  bool stream;
  std::vector<int32_t> prompt;
  int max_tokens;
};

struct ModeResult {
  std::string name;
  std::vector<double> itl, ttft_long;
  double density = 0, wall = 0;
  int64_t tokens = 0, shed = 0, iterations = 0;
  std::vector<double> ratio, chunk;  // measured/predicted; prefill tokens beside decodes
};

ModeResult RunMode(const std::string& name, spear::server::ModelHost& host,
                   const spear::engine::EngineLoopOptions& lo, const std::vector<Arrival>& plan,
                   const Clock& clock, spear::engine::QualityPolicy quality, std::FILE* trace) {
  Observer obs;
  obs.trace = trace;
  obs.mode = name;
  auto loop_or = EngineLoop::Create(host.engine.get(), host.ec.get(), lo, &clock, &obs);
  if (!loop_or.ok()) {
    std::fprintf(stderr, "spear-sched-bench: %s\n", loop_or.status().ToString().c_str());
    std::exit(1);
  }
  std::unique_ptr<EngineLoop> loop = std::move(*loop_or);
  loop->Start();
  std::vector<std::shared_ptr<Recorder>> recs;
  std::vector<int64_t> ids;
  const double t0 = clock.Now();
  for (const Arrival& a : plan) {
    const double wait = t0 + a.at - clock.Now();
    if (wait > 0) std::this_thread::sleep_for(std::chrono::duration<double>(wait));
    ExecuteSpec s;
    s.prompt = a.prompt;
    s.options.max_new_tokens = a.max_tokens;
    s.options.stop_on_eos = false;
    s.spec.quality = quality;
    auto rec = std::make_shared<Recorder>(&clock);
    rec->submitted = clock.Now();
    auto id = loop->Submit(s, rec);
    if (!id.ok()) {
      std::fprintf(stderr, "submit: %s\n", id.status().ToString().c_str());
      std::exit(1);
    }
    recs.push_back(rec);
    ids.push_back(*id);
  }
  for (size_t i = 0; i < plan.size(); ++i) {
    if (!plan[i].stream) recs[i]->done().WaitForNotification();
  }
  for (size_t i = 0; i < plan.size(); ++i) {
    if (plan[i].stream) loop->Cancel(ids[i]);
  }
  for (auto& r : recs) r->done().WaitForNotification();
  ModeResult m;
  m.name = name;
  m.wall = clock.Now() - t0;
  double dsum = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const std::vector<double> t = recs[i]->times();
    m.tokens += static_cast<int64_t>(t.size());
    dsum += recs[i]->density_sum();
    for (size_t k = 1; k < t.size(); ++k) m.itl.push_back(t[k] - t[k - 1]);
    if (!plan[i].stream && !t.empty()) m.ttft_long.push_back(t[0] - recs[i]->submitted);
  }
  m.density = m.tokens ? dsum / m.tokens : 0;
  const auto snap = loop->Snapshot();
  m.shed = snap.shed_iterations;
  m.iterations = snap.iterations;
  loop->Stop();
  m.ratio = obs.ratio;
  m.chunk = obs.chunk;
  return m;
}

int Main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("sched-bench"));
  spear::cli::Flags f("sched-bench");
  f.Declare("model", "smollm2-135m", "model (cache name or path)")
      .Declare("threads", "0", "compute threads (0 = all)")
      .Declare("itl-slo-ms", "0", "ITL target; 0 = 3x the predicted decode-only iteration")
      .Declare("streams", "4", "decoding requests running throughout")
      .Declare("stream-prompt", "32", "prompt tokens of a stream")
      .Declare("long", "3", "long-prompt requests")
      .Declare("long-prompt", "512", "prompt tokens of a long request")
      .Declare("long-tokens", "8", "tokens a long request generates")
      .Declare("rate", "0.25", "long-request arrivals per second (Poisson)")
      .Declare("start", "2", "seconds before the first long request")
      .Declare("static-chunk", "512", "the static baseline's prefill chunk")
      .Declare("max-batch-tokens", "576", "tokens per iteration at most (both modes)")
      .Declare("error-quantile", "1", "budget = target x min(headroom, 1 / this quantile of measured/predicted)")
      .Declare("profile-repeats", "3", "timed runs per latency-table point (median)")
      .Declare("headroom", "0.85", "the adaptive scheduler plans to headroom x the ITL target")
      .Declare("seed", "1", "arrival and prompt seed")
      .Declare("trace", "", "write every iteration to this CSV file")
      .DeclareBool("full-ec-mode", "also run the adaptive scheduler with FULL_EC requests");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (absl::Status s = f.Parse(args); !s.ok()) {
    std::fprintf(stderr, "spear-sched-bench: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  auto threads = f.Int("threads", 0, 1024);
  auto slo_ms = f.Double("itl-slo-ms", 0, 1e6);
  auto streams = f.Int("streams", 1, 256);
  auto sp = f.Int("stream-prompt", 1, 1 << 16);
  auto nlong = f.Int("long", 1, 1000);
  auto lp = f.Int("long-prompt", 1, 1 << 16);
  auto lt = f.Int("long-tokens", 1, 1 << 16);
  auto rate = f.Double("rate", 1e-6, 1e6);
  auto start = f.Double("start", 0, 1e6);
  auto sc = f.Int("static-chunk", 1, 1 << 20);
  auto mbt = f.Int("max-batch-tokens", 1, 1 << 20);
  auto seed = f.Int("seed", 0, 1ll << 62);
  auto headroom = f.Double("headroom", 0.01, 1);
  auto reps = f.Int("profile-repeats", 1, 100);
  auto eq = f.Double("error-quantile", 0, 1);
  for (const absl::Status& s : {threads.status(), slo_ms.status(), streams.status(), sp.status(),
                                nlong.status(), lp.status(), lt.status(), rate.status(),
                                start.status(), sc.status(), mbt.status(), seed.status(),
                                headroom.status(), reps.status(), eq.status()}) {
    if (!s.ok()) {
      std::fprintf(stderr, "spear-sched-bench: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  if (*sc + *streams > *mbt) {
    std::fprintf(stderr, "spear-sched-bench: --max-batch-tokens must hold the static chunk + streams\n");
    return 2;
  }

  spear::server::HostOptions ho;
  ho.model = f.Str("model");
  ho.threads = static_cast<int>(*threads);
  ho.max_batch_tokens = *mbt;
  const int64_t stream_tokens = 100000;  // cancelled at the end
  ho.kv_tokens = (*streams) * (*sp + 4096) + (*nlong) * (*lp + *lt) + 1024;
  auto host_or = spear::server::OpenModelHost(ho);
  if (!host_or.ok()) {
    std::fprintf(stderr, "spear-sched-bench: %s\n", host_or.status().ToString().c_str());
    return 1;
  }
  spear::server::ModelHost host = std::move(*host_or);
  const int64_t ctx = host.model->config.max_position;
  spear::engine::SteadyClock clock;

  // Profile once; both modes start from the same table.
  spear::engine::EngineLoopOptions lo;
  lo.scheduler.max_batch_tokens = *mbt;
  lo.scheduler.max_running = 256;
  lo.scheduler.max_waiting = 256;
  lo.profile.max_tokens = *mbt;
  lo.profile.repeats = static_cast<int>(*reps);
  lo.prefix_caching = false;
  const double tp = clock.Now();
  auto prof = EngineLoop::Create(host.engine.get(), host.ec.get(), lo, &clock, nullptr);
  if (!prof.ok()) {
    std::fprintf(stderr, "spear-sched-bench: %s\n", prof.status().ToString().c_str());
    return 1;
  }
  lo.table = (*prof)->latency_points();
  const double profile_s = clock.Now() - tp;
  prof->reset();
  const auto& t = *lo.table;
  auto predict = [&](int64_t tokens) {
    return (*spear::engine::LatencyTable::Create(t)).Predict(tokens, host.ec->num_units() ? 1 : 0);
  };
  const double slo = *slo_ms > 0 ? *slo_ms / 1e3 : 3 * predict(*streams);
  lo.scheduler.default_itl_slo = slo;
  lo.scheduler.slo_headroom = *headroom;
  lo.scheduler.error_quantile = *eq;

  // One arrival schedule for both modes.
  std::mt19937_64 rng(static_cast<uint64_t>(*seed));
  const int32_t vocab = static_cast<int32_t>(host.model->config.vocab_size);
  std::uniform_int_distribution<int32_t> tok(100, std::max(101, vocab - 1));
  std::exponential_distribution<double> gap(*rate);
  std::vector<Arrival> plan;
  const int64_t stream_max = std::min<int64_t>(stream_tokens, ctx > 0 ? ctx - *sp : stream_tokens);
  for (int64_t i = 0; i < *streams; ++i) {
    Arrival a{0.05 * i, true, {}, static_cast<int>(stream_max)};
    for (int64_t k = 0; k < *sp; ++k) a.prompt.push_back(tok(rng));
    plan.push_back(a);
  }
  double at = *start;
  for (int64_t i = 0; i < *nlong; ++i) {
    Arrival a{at, false, {}, static_cast<int>(*lt)};
    for (int64_t k = 0; k < *lp; ++k) a.prompt.push_back(tok(rng));
    plan.push_back(a);
    at += gap(rng);
  }

  std::printf("spear-sched-bench: model %s (%s), %d threads, %lld EC units\n", host.name.c_str(),
              host.quantization.c_str(), host.engine->options().num_threads,
              static_cast<long long>(host.ec->num_units()));
  std::printf("latency table (profiled in %.1f s; tokens:seconds%s): ", profile_s,
              host.ec->num_units() > 0 ? " no EC/full EC" : "");
  for (size_t i = 0; i < t.tokens.size(); ++i) {
    if (host.ec->num_units() > 0) {
      std::printf("%d:%.1f/%.1fms ", t.tokens[i], t.seconds_no_ec[i] * 1e3,
                  t.seconds_full_ec[i] * 1e3);
    } else {
      std::printf("%d:%.1fms ", t.tokens[i], t.seconds_full_ec[i] * 1e3);
    }
  }
  std::printf("\nworkload: %lld streams (prompt %lld) + %lld long requests (prompt %lld, %lld "
              "tokens) at %.2f/s from t=%.1fs; ITL target %.1f ms (planned to <= %.0f%%, error quantile %.2f)\n",
              static_cast<long long>(*streams), static_cast<long long>(*sp),
              static_cast<long long>(*nlong), static_cast<long long>(*lp),
              static_cast<long long>(*lt), *rate, *start, slo * 1e3, *headroom * 100, *eq);
  std::fflush(stdout);

  spear::engine::EngineLoopOptions adaptive = lo;
  spear::engine::EngineLoopOptions fixed = lo;
  fixed.scheduler.adaptive = false;
  fixed.scheduler.static_chunk = *sc;
  std::vector<ModeResult> res;
  std::FILE* trace = nullptr;
  if (!f.Str("trace").empty()) {
    trace = std::fopen(f.Str("trace").c_str(), "w");
    if (trace != nullptr) std::fprintf(trace, "mode,decodes,prefill,predicted_s,measured_s,ec_density\n");
  }
  using spear::engine::QualityPolicy;
  res.push_back(RunMode("adaptive (SLO)", host, adaptive, plan, clock, QualityPolicy::kAuto, trace));
  res.push_back(
      RunMode(absl::StrCat("static ", *sc), host, fixed, plan, clock, QualityPolicy::kAuto, trace));
  if (host.ec->num_units() > 0 && f.Bool("full-ec-mode")) {
    // The same adaptive scheduler with every request FULL_EC: ECs are never
    // shed, so when even decode-only iterations exceed the target, so does ITL.
    res.push_back(
        RunMode("adaptive FULL_EC", host, adaptive, plan, clock, QualityPolicy::kFullEc, trace));
  }

  std::printf("\n%-16s %9s %9s %9s %8s %10s %10s %10s %8s %6s %7s\n", "mode", "ITL p50", "ITL p99",
              "ITL max", "ITL<=SLO", "TTFT mean", "TTFT p50", "TTFT max", "EC dens", "shed",
              "wall s");
  for (const ModeResult& m : res) {
    int64_t within = 0;
    for (double x : m.itl) within += x <= slo;
    double tm = 0;
    for (double x : m.ttft_long) tm += x;
    tm = m.ttft_long.empty() ? 0 : tm / m.ttft_long.size();
    std::printf("%-16s %7.1fms %7.1fms %7.1fms %7.1f%% %8.2f s %8.2f s %8.2f s %8.2f %6lld %7.1f\n",
                m.name.c_str(), Percentile(m.itl, 0.5) * 1e3, Percentile(m.itl, 0.99) * 1e3,
                Percentile(m.itl, 1.0) * 1e3, m.itl.empty() ? 0 : 100.0 * within / m.itl.size(),
                tm, Percentile(m.ttft_long, 0.5), Percentile(m.ttft_long, 1.0), m.density,
                static_cast<long long>(m.shed), m.wall);
  }
  std::printf("\n%-16s %12s %12s %12s %14s %14s\n", "mode", "iterations", "meas/pred p50",
              "meas/pred p90", "chunk p50 (w/ decodes)", "chunk max");
  for (const ModeResult& m : res) {
    std::printf("%-16s %12lld %12.2f %12.2f %14.0f %14.0f\n", m.name.c_str(),
                static_cast<long long>(m.iterations), Percentile(m.ratio, 0.5),
                Percentile(m.ratio, 0.9), Percentile(m.chunk, 0.5), Percentile(m.chunk, 1.0));
  }
  if (trace != nullptr) std::fclose(trace);
  const double p99a = Percentile(res[0].itl, 0.99), p99s = Percentile(res[1].itl, 0.99);
  double ta = 0, ts = 0;
  for (double x : res[0].ttft_long) ta += x;
  for (double x : res[1].ttft_long) ts += x;
  std::printf("\nITL p99: adaptive %.1f ms (%s the %.1f ms target), static %.1f ms (%s); "
              "static/adaptive = %.2fx\n",
              p99a * 1e3, p99a <= slo ? "within" : "MISSES", slo * 1e3, p99s * 1e3,
              p99s <= slo ? "within" : "misses", p99a > 0 ? p99s / p99a : 0);
  std::printf("TTFT of long requests (mean): adaptive %.2f s, static %.2f s; adaptive/static = "
              "%.2fx\n",
              ta / res[0].ttft_long.size(), ts / res[1].ttft_long.size(), ts > 0 ? ta / ts : 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
