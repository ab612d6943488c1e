// The router against fake workers (in-process, loopback gRPC): output
// assembly, stop strings, failover, cancellation and deadline propagation,
// admission (reduced EC, queue, reject with retry hint), validation, auth.
#include <chrono>
#include <fstream>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "router/service/router_server.h"
#include "spear/v1/generation.grpc.pb.h"
#include "tests/router/fake_worker.h"
#include "tests/test_util.h"
#include "worker/model/gguf.h"
#include "worker/model/tokenizer.h"

namespace spear::router {
namespace {

using spear::testing::FakeWorker;
using namespace std::chrono_literals;

std::string TokenizerModel() { return spear::testing::TestdataPath("tiny_smollm.gguf"); }

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 2; ++i) {
      workers_.push_back(std::make_unique<FakeWorker>("fake-" + std::to_string(i)));
      workers_.back()->Start();
    }
  }
  void TearDown() override {
    router_.reset();
    workers_.clear();
  }
  RouterOptions Options() {
    RouterOptions o;
    o.host = "127.0.0.1";
    o.metrics_port = -1;
    o.frontend.model = TokenizerModel();
    o.frontend.model_name = "tiny";
    for (auto& w : workers_) o.registry.static_workers.push_back(w->address());
    o.registry.health_interval_seconds = 0.05;
    o.registry.stats_interval_seconds = 0.02;
    o.admission.queue_timeout_seconds = 0.5;
    o.drain_timeout_seconds = 2;
    return o;
  }
  void StartRouter(RouterOptions o, int wait_workers = 2, const std::string& auth = "") {
    auto r = RouterServer::Start(o);
    ASSERT_TRUE(r.ok()) << r.status();
    router_ = std::move(*r);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(router_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = spear::v1::Generation::NewStub(channel_);
    // Wait until the registry sees the workers (ListModels reports them).
    for (int i = 0; i < 200; ++i) {
      grpc::ClientContext ctx;
      if (!auth.empty()) ctx.AddMetadata("authorization", auth);
      spear::v1::ListModelsResponse resp;
      if (stub_->ListModels(&ctx, {}, &resp).ok() && resp.models(0).healthy_workers() >= wait_workers) return;
      std::this_thread::sleep_for(10ms);
    }
    FAIL() << "workers never became healthy";
  }
  spear::v1::GenerateRequest Req(const std::string& prompt, int max_tokens) {
    spear::v1::GenerateRequest r;
    r.set_prompt(prompt);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.set_slo_class(spear::v1::SLO_CLASS_BATCH);
    return r;
  }
  std::vector<int32_t> Encode(const std::string& text) {
    auto g = model::GgufFile::Open(TokenizerModel());
    auto t = model::TokenizerFromGguf(**g);
    return (*t)->Encode(text, true);
  }
  std::string Decode(const std::vector<int32_t>& ids) {
    auto g = model::GgufFile::Open(TokenizerModel());
    auto t = model::TokenizerFromGguf(**g);
    return (*t)->Decode(ids);
  }

  std::vector<std::unique_ptr<FakeWorker>> workers_;
  std::unique_ptr<RouterServer> router_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<spear::v1::Generation::Stub> stub_;
};

TEST_F(RouterTest, UnaryAndStreamAssembleTheWorkersTokens) {
  StartRouter(Options());
  const std::string prompt = "hello world, the quick brown fox";
  const auto ids = Encode(prompt);
  grpc::ClientContext ctx;
  spear::v1::GenerateResponse resp;
  auto req = Req(prompt, static_cast<int>(ids.size()));
  ASSERT_TRUE(stub_->Generate(&ctx, req, &resp).ok());
  EXPECT_EQ(std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end()), ids);
  EXPECT_EQ(resp.text(), Decode(ids));
  EXPECT_EQ(resp.finish_reason(), spear::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(resp.usage().prompt_tokens(), static_cast<int>(ids.size()));
  EXPECT_EQ(resp.usage().completion_tokens(), static_cast<int>(ids.size()));
  EXPECT_EQ(resp.model(), "tiny");
  EXPECT_FALSE(resp.worker().empty());
  EXPECT_GT(resp.timings().e2e_seconds(), 0);

  grpc::ClientContext sctx;
  auto reader = stub_->GenerateStream(&sctx, req);
  spear::v1::GenerateStreamResponse chunk;
  std::string text;
  int chunks = 0;
  spear::v1::FinishReason fr = spear::v1::FINISH_REASON_UNSPECIFIED;
  while (reader->Read(&chunk)) {
    text += chunk.text();
    ++chunks;
    if (chunk.finish_reason()) fr = chunk.finish_reason();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(text, resp.text());
  EXPECT_GT(chunks, 2);
  EXPECT_EQ(fr, spear::v1::FINISH_REASON_LENGTH);
}

TEST_F(RouterTest, StopStringEndsTheAnswerAndCancelsTheWorker) {
  StartRouter(Options());
  workers_[0]->token_delay_ms = 20;
  workers_[1]->token_delay_ms = 20;
  const std::string prompt = "alpha beta STOP gamma delta epsilon zeta eta theta";
  auto req = Req(prompt, 200);
  req.mutable_sampling()->add_stop("STOP");
  grpc::ClientContext ctx;
  spear::v1::GenerateResponse resp;
  ASSERT_TRUE(stub_->Generate(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.finish_reason(), spear::v1::FINISH_REASON_STOP);
  EXPECT_EQ(resp.text(), Decode(Encode("alpha beta ")).substr(0, resp.text().size()));
  EXPECT_EQ(resp.text().find("STOP"), std::string::npos);
  EXPECT_EQ(resp.text(), "alpha beta ");
  for (int i = 0; i < 100 && workers_[0]->cancelled + workers_[1]->cancelled < 1; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(workers_[0]->cancelled + workers_[1]->cancelled, 1);
}

TEST_F(RouterTest, FailoverBeforeTheFirstToken) {
  workers_[0]->fail_before_first = true;
  StartRouter(Options());
  for (int i = 0; i < 6; ++i) {
    grpc::ClientContext ctx;
    spear::v1::GenerateResponse resp;
    ASSERT_TRUE(stub_->Generate(&ctx, Req("retry me please", 4), &resp).ok()) << i;
    EXPECT_EQ(resp.worker(), "fake-1");
  }
}

TEST_F(RouterTest, FailureAfterTheFirstTokenIsUnavailableQuickly) {
  workers_[0]->fail_after_tokens = 2;
  workers_[1]->fail_after_tokens = 2;
  StartRouter(Options());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 10s);
  auto reader = stub_->GenerateStream(&ctx, Req("some prompt text here", 50));
  spear::v1::GenerateStreamResponse chunk;
  int n = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (reader->Read(&chunk)) ++n;
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::UNAVAILABLE) << s.error_message();
  EXPECT_EQ(n, 2);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
}

TEST_F(RouterTest, ClientCancelReachesTheWorker) {
  workers_[0]->token_delay_ms = 50;
  workers_[1]->token_delay_ms = 50;
  StartRouter(Options());
  grpc::ClientContext ctx;
  auto reader = stub_->GenerateStream(&ctx, Req("cancel me", 100));
  spear::v1::GenerateStreamResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::CANCELLED);
  for (int i = 0; i < 100 && workers_[0]->active + workers_[1]->active > 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(workers_[0]->active + workers_[1]->active, 0);
  EXPECT_EQ(workers_[0]->cancelled + workers_[1]->cancelled, 1);
}

TEST_F(RouterTest, DeadlinePropagatesToTheWorker) {
  workers_[0]->token_delay_ms = 50;
  workers_[1]->token_delay_ms = 50;
  StartRouter(Options());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 200ms);
  spear::v1::GenerateResponse resp;
  const grpc::Status s = stub_->Generate(&ctx, Req("slow one", 100), &resp);
  EXPECT_EQ(s.error_code(), grpc::DEADLINE_EXCEEDED);
  for (int i = 0; i < 100 && workers_[0]->active + workers_[1]->active > 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(workers_[0]->active + workers_[1]->active, 0);
}

TEST_F(RouterTest, AutoPolicyAdmitsWithReducedEcWhenFullEcMissesTheSlo) {
  // Full EC: 40 ms per iteration, no EC: 20 ms; ITL target 30 ms.
  workers_[0]->iteration_seconds = 0.04;
  workers_[1]->iteration_seconds = 0.04;
  StartRouter(Options());
  auto req = Req("reduce my ec", 3);
  req.set_slo_class(spear::v1::SLO_CLASS_STANDARD);
  req.mutable_slo()->set_itl_seconds(0.03);
  req.mutable_slo()->set_ttft_seconds(10);
  grpc::ClientContext ctx;
  spear::v1::GenerateResponse resp;
  ASSERT_TRUE(stub_->Generate(&ctx, req, &resp).ok());
  EXPECT_GT(resp.ec_density(), 0.1);
  EXPECT_LT(resp.ec_density(), 0.6);  // 20 + 20 d <= 24 -> d = 0.2

  // FULL_EC never sheds: nothing meets, the queue times out.
  req.set_quality(spear::v1::QUALITY_POLICY_FULL_EC);
  grpc::ClientContext ctx2;
  const grpc::Status s = stub_->Generate(&ctx2, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED) << s.error_message();
  auto it = ctx2.GetServerTrailingMetadata().find("retry-after-ms");
  ASSERT_NE(it, ctx2.GetServerTrailingMetadata().end());
  EXPECT_GT(std::stoi(std::string(it->second.data(), it->second.size())), 0);
}

TEST_F(RouterTest, FullQueueRejectsAtOnceWithARetryHint) {
  workers_[0]->iteration_seconds = 1.0;
  workers_[1]->iteration_seconds = 1.0;
  auto o = Options();
  o.admission.max_queue = 0;
  StartRouter(o);
  auto req = Req("too slow", 3);
  req.set_slo_class(spear::v1::SLO_CLASS_INTERACTIVE);
  grpc::ClientContext ctx;
  spear::v1::GenerateResponse resp;
  const auto t0 = std::chrono::steady_clock::now();
  const grpc::Status s = stub_->Generate(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 200ms);
  EXPECT_NE(ctx.GetServerTrailingMetadata().find("retry-after-ms"),
            ctx.GetServerTrailingMetadata().end());
}

TEST_F(RouterTest, DrainingWorkersGetNoNewRequests) {
  workers_[1]->draining = true;
  StartRouter(Options(), 1);
  for (int i = 0; i < 4; ++i) {
    grpc::ClientContext ctx;
    spear::v1::GenerateResponse resp;
    ASSERT_TRUE(stub_->Generate(&ctx, Req("where do I go", 2), &resp).ok());
    EXPECT_EQ(resp.worker(), "fake-0");
  }
}

TEST_F(RouterTest, MalformedRequestsGetTheRightCodes) {
  StartRouter(Options());
  struct Case {
    const char* what;
    std::function<void(spear::v1::GenerateRequest*)> edit;
    grpc::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"unknown model", [](auto* r) { r->set_model("nope"); }, grpc::NOT_FOUND},
      {"no input", [](auto* r) { r->clear_input(); }, grpc::INVALID_ARGUMENT},
      {"empty prompt", [](auto* r) { r->set_prompt(""); }, grpc::INVALID_ARGUMENT},
      {"negative itl", [](auto* r) { r->mutable_slo()->set_itl_seconds(-0.1); }, grpc::INVALID_ARGUMENT},
      {"empty ids", [](auto* r) { r->mutable_prompt_tokens(); }, grpc::INVALID_ARGUMENT},
      {"negative id", [](auto* r) { r->mutable_prompt_tokens()->add_ids(-1); }, grpc::INVALID_ARGUMENT},
      {"id >= vocab", [](auto* r) { r->mutable_prompt_tokens()->add_ids(1 << 30); }, grpc::INVALID_ARGUMENT},
      {"negative max_tokens", [](auto* r) { r->mutable_sampling()->set_max_tokens(-1); }, grpc::INVALID_ARGUMENT},
      {"huge max_tokens", [](auto* r) { r->mutable_sampling()->set_max_tokens(1 << 30); }, grpc::INVALID_ARGUMENT},
      {"temperature", [](auto* r) { r->mutable_sampling()->set_temperature(-0.5f); }, grpc::INVALID_ARGUMENT},
      {"temperature nan", [](auto* r) { r->mutable_sampling()->set_temperature(NAN); }, grpc::INVALID_ARGUMENT},
      {"top_p", [](auto* r) { r->mutable_sampling()->set_top_p(1.5f); }, grpc::INVALID_ARGUMENT},
      {"top_k", [](auto* r) { r->mutable_sampling()->set_top_k(-3); }, grpc::INVALID_ARGUMENT},
      {"17 stops", [](auto* r) { for (int i = 0; i < 17; ++i) r->mutable_sampling()->add_stop("x"); }, grpc::INVALID_ARGUMENT},
      {"empty stop", [](auto* r) { r->mutable_sampling()->add_stop(""); }, grpc::INVALID_ARGUMENT},
      {"long stop", [](auto* r) { r->mutable_sampling()->add_stop(std::string(300, 'a')); }, grpc::INVALID_ARGUMENT},
      {"slo class", [](auto* r) { r->set_slo_class(static_cast<spear::v1::SloClass>(42)); }, grpc::INVALID_ARGUMENT},
      {"quality", [](auto* r) { r->set_quality(static_cast<spear::v1::QualityPolicy>(-7)); }, grpc::INVALID_ARGUMENT},
      {"negative ttft", [](auto* r) { r->mutable_slo()->set_ttft_seconds(-1); }, grpc::INVALID_ARGUMENT},
      {"request id", [](auto* r) { r->set_request_id(std::string(200, 'r')); }, grpc::INVALID_ARGUMENT},
      {"request id ctl", [](auto* r) { r->set_request_id("a\nb"); }, grpc::INVALID_ARGUMENT},
      {"chat with ids", [](auto* r) { r->mutable_prompt_tokens()->add_ids(1); r->set_chat(true); }, grpc::INVALID_ARGUMENT},
      {"over context", [](auto* r) { r->mutable_sampling()->set_max_tokens(4096); }, grpc::INVALID_ARGUMENT},
  };
  for (const Case& c : cases) {
    auto req = Req("a valid prompt", 4);
    c.edit(&req);
    grpc::ClientContext ctx;
    spear::v1::GenerateResponse resp;
    const grpc::Status s = stub_->Generate(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_FALSE(s.error_message().empty()) << c.what;
    grpc::ClientContext sctx;
    auto reader = stub_->GenerateStream(&sctx, req);
    spear::v1::GenerateStreamResponse chunk;
    EXPECT_FALSE(reader->Read(&chunk)) << c.what;
    EXPECT_EQ(reader->Finish().error_code(), c.code) << c.what << " (stream)";
  }
}

TEST_F(RouterTest, TokenizeAndListModels) {
  StartRouter(Options());
  grpc::ClientContext ctx;
  spear::v1::TokenizeRequest tr;
  tr.set_text("hello world");
  spear::v1::TokenizeResponse resp;
  ASSERT_TRUE(stub_->Tokenize(&ctx, tr, &resp).ok());
  EXPECT_EQ(resp.ids_size(), resp.pieces_size());
  EXPECT_GT(resp.ids_size(), 0);
  grpc::ClientContext ctx2;
  tr.set_model("other");
  EXPECT_EQ(stub_->Tokenize(&ctx2, tr, &resp).error_code(), grpc::NOT_FOUND);
  grpc::ClientContext ctx3;
  spear::v1::ListModelsResponse lm;
  ASSERT_TRUE(stub_->ListModels(&ctx3, {}, &lm).ok());
  ASSERT_EQ(lm.models_size(), 1);
  EXPECT_EQ(lm.models(0).name(), "tiny");
  EXPECT_EQ(lm.models(0).healthy_workers(), 2);
  EXPECT_EQ(lm.models(0).architecture(), "llama");
}

TEST_F(RouterTest, BearerTokenAuth) {
  const std::string file = ::testing::TempDir() + "/router_token";
  std::ofstream(file) << "s3cret\n";
  auto o = Options();
  o.auth_token_file = file;
  StartRouter(o, 0, "Bearer s3cret");
  auto call = [&](const char* auth) {
    grpc::ClientContext ctx;
    if (auth) ctx.AddMetadata("authorization", auth);
    spear::v1::TokenizeRequest tr;
    tr.set_text("x");
    spear::v1::TokenizeResponse resp;
    return stub_->Tokenize(&ctx, tr, &resp).error_code();
  };
  EXPECT_EQ(call(nullptr), grpc::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer wrong"), grpc::UNAUTHENTICATED);
  EXPECT_EQ(call("s3cret"), grpc::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer s3cret"), grpc::OK);
}

TEST_F(RouterTest, NoHealthyWorkerIsUnavailable) {
  auto o = Options();
  o.registry.static_workers = {"127.0.0.1:1"};
  o.admission.queue_timeout_seconds = 0.2;
  StartRouter(o, 0);
  grpc::ClientContext ctx;
  spear::v1::GenerateResponse resp;
  EXPECT_EQ(stub_->Generate(&ctx, Req("anyone?", 2), &resp).error_code(), grpc::UNAVAILABLE);
}

}  // namespace
}  // namespace spear::router

namespace spear::router {
namespace {

TEST_F(RouterTest, ShutdownFinishesInFlightStreamsAndRefusesNewOnes) {
  workers_[0]->token_delay_ms = 20;
  workers_[1]->token_delay_ms = 20;
  StartRouter(Options());
  grpc::ClientContext ctx;
  auto reader = stub_->GenerateStream(&ctx, Req("finish me please", 30));
  spear::v1::GenerateStreamResponse chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  std::thread stopper([&] { router_->Shutdown(); });
  std::this_thread::sleep_for(100ms);
  {
    grpc::ClientContext c2;
    spear::v1::GenerateResponse r2;
    EXPECT_EQ(stub_->Generate(&c2, Req("too late", 2), &r2).error_code(), grpc::UNAVAILABLE);
  }
  int n = 1;
  while (reader->Read(&chunk)) ++n;
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_GE(n, 30);
  stopper.join();
}

TEST(RegistryTest, DnsNameResolvesToWorkers) {
  spear::testing::FakeWorker w("dns-0");
  w.Start();
  RegistryOptions o;
  o.dns_name = "localhost:" + std::to_string(w.port());
  o.health_interval_seconds = 0.05;
  o.stats_interval_seconds = 0.02;
  o.dns_interval_seconds = 0.2;
  auto reg = WorkerRegistry::Create(o, nullptr);
  ASSERT_TRUE(reg.ok()) << reg.status();
  (*reg)->Start();
  EXPECT_TRUE((*reg)->WaitForAdmissible(1, 5));
  bool found = false;
  for (const auto& h : (*reg)->Workers()) found |= h->address() == w.address();
  EXPECT_TRUE(found);
  (*reg)->Stop();
  EXPECT_FALSE(WorkerRegistry::Create({{"a:1"}, "b:2"}, nullptr).ok());
  EXPECT_FALSE(WorkerRegistry::Create({{"nocolon"}}, nullptr).ok());
  EXPECT_FALSE(WorkerRegistry::Create({{"h:99999"}}, nullptr).ok());
}

}  // namespace
}  // namespace spear::router
