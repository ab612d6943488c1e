// spear-worker as a real process on loopback, driven through the internal
// Worker gRPC API: output equals Engine::Generate for a fixed seed, cancel
// mid-stream and deadlines free KV (the Prometheus gauge returns to 0),
// malformed requests get INVALID_ARGUMENT, the bounded queue answers
// RESOURCE_EXHAUSTED, and SIGTERM drains without losing accepted requests.
//
// The model is a random tiny LLaMA written to a temporary directory (long
// context so generations last long enough to cancel mid-stream).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "spear/v1/worker.grpc.pb.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/engine.h"

namespace spear {
namespace {

using v1::ExecuteEvent;
using v1::ExecuteRequest;

constexpr int kVocab = 256;
constexpr int kContext = 8192;

struct WorkerProcess {
  pid_t pid = -1;
  int grpc_port = 0, metrics_port = 0;
  std::string log;

  ~WorkerProcess() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  // SIGTERM and the exit status (-1 on timeout).
  int Terminate(double timeout_s) {
    kill(pid, SIGTERM);
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
};

// Starts spear-worker and waits for its LISTENING line.
std::unique_ptr<WorkerProcess> Start(const std::string& model, std::vector<std::string> extra) {
  auto w = std::make_unique<WorkerProcess>();
  w->log = testing::MakeTempDir("worker_log") + "/worker.log";
  int out[2];
  if (pipe(out) != 0) return nullptr;
  std::vector<std::string> args = {SPEAR_WORKER_BIN, "--model", model, "--threads", "2",
                                   "--kv-tokens", "32768", "--max-batch-tokens", "256"};
  args.insert(args.end(), extra.begin(), extra.end());
  w->pid = fork();
  if (w->pid == 0) {
    dup2(out[1], 1);
    int err = open(w->log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(err, 2);
    close(out[0]);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out[1]);
  std::string line;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < end) {
    pollfd p{out[0], POLLIN, 0};
    if (poll(&p, 1, 100) > 0) {
      char buf[256];
      const ssize_t n = read(out[0], buf, sizeof(buf));
      if (n <= 0) break;
      line.append(buf, n);
    }
  }
  close(out[0]);
  if (sscanf(line.c_str(), "LISTENING grpc=%d metrics=%d", &w->grpc_port, &w->metrics_port) != 2) {
    ADD_FAILURE() << "no LISTENING line, got '" << line << "'";
    return nullptr;
  }
  return w;
}

// GET /metrics and the value of one series (first match), NaN if absent.
double Metric(int port, const std::string& name, const std::string& label_filter = "") {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return NAN;
  }
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string body;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) body.append(buf, n);
  close(fd);
  for (absl::string_view l : absl::StrSplit(body, '\n')) {
    if (!absl::StartsWith(l, name + "{") && !absl::StartsWith(l, name + " ")) continue;
    if (!label_filter.empty() && l.find(label_filter) == absl::string_view::npos) continue;
    double v;
    if (absl::SimpleAtod(l.substr(l.rfind(' ') + 1), &v)) return v;
  }
  return NAN;
}

// Polls until the gauge reads `want` (within `seconds`).
bool WaitMetric(int port, const std::string& name, double want, double seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < end) {
    if (Metric(port, name) == want) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

std::vector<int32_t> Prompt(int n, uint32_t seed) {
  std::vector<int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = static_cast<int32_t>(3 + (seed * 31 + i * 17) % 200);
  return p;
}

ExecuteRequest Req(const std::vector<int32_t>& prompt, int max_tokens, float temperature = 0,
                   uint64_t seed = 0) {
  ExecuteRequest r;
  for (int32_t t : prompt) r.add_prompt_tokens(t);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_seed(seed);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  bool accepted = false;
  bool finished = false;
  v1::Finished fin;
};

StreamResult RunStream(v1::Worker::Stub* stub, const ExecuteRequest& req,
                       double deadline_s = 60) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int>(deadline_s * 1000)));
  StreamResult r;
  auto reader = stub->Execute(&ctx, req);
  ExecuteEvent ev;
  while (reader->Read(&ev)) {
    if (ev.has_accepted()) r.accepted = true;
    if (ev.has_tokens()) r.tokens.insert(r.tokens.end(), ev.tokens().ids().begin(), ev.tokens().ids().end());
    if (ev.has_finished()) {
      r.finished = true;
      r.fin = ev.finished();
    }
  }
  r.status = reader->Finish();
  return r;
}

class WorkerProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::MakeTempDir("worker_model"));
    testing::TinyModelSpec spec;
    spec.vocab = kVocab;
    spec.max_position = kContext;
    spec.hidden = 128;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.head_dim = 32;
    spec.intermediate = 256;
    spec.layers = 4;
    ASSERT_TRUE(testing::WriteTinyModel(*model_dir_, spec).ok());
    worker_ = Start(*model_dir_, {"--max-running", "2", "--max-waiting", "2"}).release();
    ASSERT_NE(worker_, nullptr);
    auto ch = grpc::CreateChannel(absl::StrCat("127.0.0.1:", worker_->grpc_port),
                                  grpc::InsecureChannelCredentials());
    stub_ = v1::Worker::NewStub(ch).release();
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete worker_;
    delete model_dir_;
  }
  static std::string* model_dir_;
  static WorkerProcess* worker_;
  static v1::Worker::Stub* stub_;
};
std::string* WorkerProcessTest::model_dir_ = nullptr;
WorkerProcess* WorkerProcessTest::worker_ = nullptr;
v1::Worker::Stub* WorkerProcessTest::stub_ = nullptr;

TEST_F(WorkerProcessTest, ExecuteEqualsEngineGenerate) {
  auto model = model::LoadModel(*model_dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  engine::EngineOptions eo;
  eo.num_threads = 2;
  eo.kv_cache.num_blocks = 256;
  auto eng = engine::Engine::Create(model->get(), eo);
  ASSERT_TRUE(eng.ok());
  for (int i = 0; i < 2; ++i) {
    engine::SamplingParams sp;
    sp.temperature = i == 0 ? 0.f : 0.9f;
    sp.seed = 42;
    engine::GenerateOptions go;
    go.max_new_tokens = 24;
    go.stop_on_eos = false;
    auto want = (*eng)->Generate(Prompt(9 + i, i), sp, go);
    ASSERT_TRUE(want.ok());
    StreamResult got = RunStream(stub_, Req(Prompt(9 + i, i), 24, sp.temperature, 42));
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_TRUE(got.accepted);
    ASSERT_TRUE(got.finished);
    EXPECT_EQ(got.tokens, want->tokens) << "temperature " << sp.temperature;
    EXPECT_EQ(got.fin.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(got.fin.usage().prompt_tokens(), 9 + i);
    EXPECT_EQ(got.fin.usage().completion_tokens(), 24);
  }
  EXPECT_TRUE(WaitMetric(worker_->metrics_port, "spear_kv_cache_usage_perc", 0, 5));
}

TEST_F(WorkerProcessTest, CancelMidStreamFreesKv) {
  grpc::ClientContext ctx;
  auto reader = stub_->Execute(&ctx, Req(Prompt(20, 3), kContext - 100));
  ExecuteEvent ev;
  int tokens = 0;
  while (tokens < 5 && reader->Read(&ev)) tokens += ev.tokens().ids_size();
  ASSERT_EQ(tokens, 5);
  EXPECT_GT(Metric(worker_->metrics_port, "spear_kv_cache_usage_perc"), 0);
  ctx.TryCancel();
  while (reader->Read(&ev)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitMetric(worker_->metrics_port, "spear_kv_cache_usage_perc", 0, 5));
  EXPECT_TRUE(WaitMetric(worker_->metrics_port, "spear_num_requests_running", 0, 5));
  EXPECT_GE(Metric(worker_->metrics_port, "spear_worker_requests_total", "CANCELLED"), 1);
}

TEST_F(WorkerProcessTest, CancelRpcByRequestId) {
  ExecuteRequest req = Req(Prompt(20, 4), kContext - 100);
  req.set_request_id("cancel-me");
  grpc::ClientContext ctx;
  auto reader = stub_->Execute(&ctx, req);
  ExecuteEvent ev;
  while (reader->Read(&ev) && !ev.has_tokens()) {
  }
  grpc::ClientContext cctx;
  v1::CancelRequest creq;
  creq.set_request_id("cancel-me");
  v1::CancelResponse cresp;
  ASSERT_TRUE(stub_->Cancel(&cctx, creq, &cresp).ok());
  EXPECT_TRUE(cresp.found());
  while (reader->Read(&ev)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitMetric(worker_->metrics_port, "spear_kv_cache_usage_perc", 0, 5));
}

TEST_F(WorkerProcessTest, DeadlineExceededFreesKv) {
  StreamResult r = RunStream(stub_, Req(Prompt(30, 5), kContext - 100), /*deadline_s=*/0.3);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_FALSE(r.finished);
  EXPECT_TRUE(WaitMetric(worker_->metrics_port, "spear_kv_cache_usage_perc", 0, 5));
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!(Metric(worker_->metrics_port, "spear_worker_requests_total", "DEADLINE_EXCEEDED") >= 1) &&
         std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(Metric(worker_->metrics_port, "spear_worker_requests_total", "DEADLINE_EXCEEDED"), 1);
}

TEST_F(WorkerProcessTest, MalformedRequestsAreInvalidArgument) {
  std::vector<std::pair<std::string, ExecuteRequest>> bad;
  auto base = [] { return Req(Prompt(5, 1), 4); };
  ExecuteRequest r;
  r = base();
  r.clear_prompt_tokens();
  bad.push_back({"empty prompt", r});
  r = base();
  r.add_prompt_tokens(kVocab);
  bad.push_back({"token id = vocab", r});
  r = base();
  r.add_prompt_tokens(-1);
  bad.push_back({"negative token id", r});
  r = base();
  r.mutable_sampling()->set_max_tokens(-1);
  bad.push_back({"negative max_tokens", r});
  r = base();
  r.mutable_sampling()->set_temperature(11);
  bad.push_back({"temperature 11", r});
  r = base();
  r.mutable_sampling()->set_temperature(NAN);
  bad.push_back({"temperature NaN", r});
  r = base();
  r.mutable_sampling()->set_top_p(1.5f);
  bad.push_back({"top_p 1.5", r});
  r = base();
  r.mutable_sampling()->set_top_k(kVocab + 1);
  bad.push_back({"top_k > vocab", r});
  r = base();
  for (int i = 0; i < 17; ++i) r.mutable_sampling()->add_stop("x");
  bad.push_back({"17 stop strings", r});
  r = Req(std::vector<int32_t>(kContext, 5), 1);
  bad.push_back({"prompt fills the context", r});
  r = Req(Prompt(100, 1), kContext);
  bad.push_back({"prompt + max_tokens > context", r});
  r = base();
  r.set_quality(static_cast<v1::QualityPolicy>(9));
  bad.push_back({"unknown quality", r});
  r = base();
  r.set_max_ec_density(2);
  bad.push_back({"max_ec_density 2", r});
  r = base();
  r.set_request_id(std::string(200, 'a'));
  bad.push_back({"request id too long", r});
  r = base();
  r.set_request_id("bad\nid");
  bad.push_back({"request id not printable", r});
  r = base();
  r.mutable_slo()->set_itl_seconds(-1);
  bad.push_back({"negative ITL target", r});
  for (auto& [what, req] : bad) {
    StreamResult res = RunStream(stub_, req, 10);
    EXPECT_EQ(res.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << what << ": " << res.status.error_message();
    EXPECT_FALSE(res.status.error_message().empty()) << what;
  }
  // Still serving.
  StreamResult ok = RunStream(stub_, Req(Prompt(5, 1), 3));
  EXPECT_TRUE(ok.status.ok());
  EXPECT_EQ(ok.tokens.size(), 3u);
}

TEST_F(WorkerProcessTest, StatsReportsTheLatencyTable) {
  grpc::ClientContext ctx;
  v1::StatsResponse s;
  ASSERT_TRUE(stub_->Stats(&ctx, v1::StatsRequest(), &s).ok());
  EXPECT_EQ(s.vocab_size(), kVocab);
  EXPECT_EQ(s.max_context(), kContext);
  EXPECT_EQ(s.max_batch_tokens(), 256);
  ASSERT_GE(s.latency().tokens_size(), 2);
  EXPECT_EQ(s.latency().tokens(0), 1);
  EXPECT_EQ(s.latency().tokens(s.latency().tokens_size() - 1), 256);
  EXPECT_EQ(s.latency().seconds_no_ec_size(), s.latency().tokens_size());
  EXPECT_GT(s.latency().seconds_full_ec(s.latency().tokens_size() - 1), 0);
  EXPECT_FALSE(s.draining());
}

// The backend is exported; --device errors are exit codes with the reason
// on stderr (bad value: 2; cuda on a build or machine without CUDA: 1,
// before any port is opened).
TEST_F(WorkerProcessTest, DeviceFlagAndBackendMetric) {
  EXPECT_EQ(Metric(worker_->metrics_port, "spear_worker_backend_info", "backend=\"cpu\""), 1);
  auto run = [&](const std::string& device, std::string* err) {
    const std::string log = testing::MakeTempDir("worker_device") + "/err.log";
    const pid_t pid = fork();
    if (pid == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 2);
      execl(SPEAR_WORKER_BIN, SPEAR_WORKER_BIN, "--model", model_dir_->c_str(), "--device",
            device.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    std::ifstream in(log);
    err->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  };
  std::string err;
  EXPECT_EQ(run("gpu", &err), 2);
  EXPECT_NE(err.find("--device must be cpu, cuda or auto, got 'gpu'"), std::string::npos) << err;
  if (system("nvidia-smi -L >/dev/null 2>&1") == 0) {
    GTEST_SKIP() << "a GPU is present: --device cuda would start";
  }
  EXPECT_EQ(run("cuda", &err), 1);
  EXPECT_NE(err.find("device cuda: "), std::string::npos) << err;
  EXPECT_EQ(err.find("LISTENING"), std::string::npos) << err;
}

TEST_F(WorkerProcessTest, BoundedQueueThenDrainLosesNothing) {
  // max-running 2 + max-waiting 2: four long requests are accepted, the
  // fifth gets RESOURCE_EXHAUSTED.
  const int kLong = 2000;
  std::vector<std::thread> threads;
  std::vector<StreamResult> results(4);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { results[i] = RunStream(stub_, Req(Prompt(10, 10 + i), kLong)); });
    // In order, so the queue is full when the fifth arrives.
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (Metric(worker_->metrics_port, "spear_num_requests_running") +
                   Metric(worker_->metrics_port, "spear_num_requests_waiting") <
               i + 1 &&
           std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  StreamResult rejected = RunStream(stub_, Req(Prompt(10, 99), kLong));
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << rejected.status.error_message();

  // SIGTERM while they run: new work is refused, accepted work completes,
  // every stream to its last event (the worker waits for the open streams
  // after its loop goes idle, then lingers 0.5 s; before, the tail of the
  // last one could be cut by the exit: "recvmsg: Connection reset by peer",
  // seen once in CI).
  kill(worker_->pid, SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  StreamResult late = RunStream(stub_, Req(Prompt(10, 98), 4), 5);
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE) << late.status.error_message();
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens.size(), static_cast<size_t>(kLong)) << i;
  }
  EXPECT_EQ(worker_->Terminate(30), 0);
  if (HasFailure()) {  // the worker's side of the drain
    std::ifstream in(worker_->log);
    std::cerr << "worker log:\n" << in.rdbuf();
  }
}

}  // namespace
}  // namespace spear
