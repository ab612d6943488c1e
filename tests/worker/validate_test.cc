// ValidateExecute: translation of a valid request and the message of each
// rejection.
#include "gtest/gtest.h"
#include "worker/server/validate.h"

namespace spear::server {
namespace {

ModelLimits Limits() {
  ModelLimits l;
  l.vocab_size = 100;
  l.max_context = 64;
  l.kv_capacity_tokens = 1000;
  return l;
}

v1::ExecuteRequest Valid() {
  v1::ExecuteRequest r;
  r.set_request_id("r1");
  for (int t : {1, 2, 3}) r.add_prompt_tokens(t);
  r.mutable_sampling()->set_max_tokens(10);
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_top_k(5);
  r.mutable_sampling()->set_seed(9);
  return r;
}

TEST(ValidateTest, TranslatesAValidRequest) {
  v1::ExecuteRequest r = Valid();
  r.set_quality(v1::QUALITY_POLICY_FULL_EC);
  r.mutable_slo()->set_itl_seconds(0.05);
  auto s = ValidateExecute(r, Limits());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->prompt, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(s->spec.request_id, "r1");
  EXPECT_EQ(s->options.max_new_tokens, 10);
  EXPECT_TRUE(s->options.stop_on_eos);
  EXPECT_FLOAT_EQ(s->sampling.temperature, 0.7f);
  EXPECT_EQ(s->sampling.top_k, 5);
  EXPECT_FLOAT_EQ(s->sampling.top_p, 1.f);  // 0 = off
  EXPECT_EQ(s->sampling.seed, 9u);
  EXPECT_EQ(s->spec.quality, engine::QualityPolicy::kFullEc);
  EXPECT_DOUBLE_EQ(s->spec.itl_slo, 0.05);
  EXPECT_DOUBLE_EQ(s->spec.max_ec_density, 1.0);  // 0 = unset = 1
}

TEST(ValidateTest, DefaultMaxTokensIsCappedByTheContext) {
  v1::ExecuteRequest r = Valid();
  r.mutable_sampling()->set_max_tokens(0);
  auto s = ValidateExecute(r, Limits());
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->options.max_new_tokens, 61);  // 64 - 3 < 256
}

TEST(ValidateTest, RejectionsNameTheField) {
  struct Case {
    const char* field;
    void (*mutate)(v1::ExecuteRequest*);
  };
  const Case cases[] = {
      {"prompt_tokens is empty", [](v1::ExecuteRequest* r) { r->clear_prompt_tokens(); }},
      {"outside the vocabulary", [](v1::ExecuteRequest* r) { r->add_prompt_tokens(100); }},
      {"max_tokens", [](v1::ExecuteRequest* r) { r->mutable_sampling()->set_max_tokens(-2); }},
      {"context length", [](v1::ExecuteRequest* r) { r->mutable_sampling()->set_max_tokens(62); }},
      {"temperature", [](v1::ExecuteRequest* r) { r->mutable_sampling()->set_temperature(-1); }},
      {"top_p", [](v1::ExecuteRequest* r) { r->mutable_sampling()->set_top_p(2); }},
      {"top_k", [](v1::ExecuteRequest* r) { r->mutable_sampling()->set_top_k(101); }},
      {"quality", [](v1::ExecuteRequest* r) { r->set_quality(static_cast<v1::QualityPolicy>(5)); }},
      {"max_ec_density", [](v1::ExecuteRequest* r) { r->set_max_ec_density(-0.5); }},
      {"request_id", [](v1::ExecuteRequest* r) { r->set_request_id(std::string(129, 'x')); }},
      {"slo", [](v1::ExecuteRequest* r) { r->mutable_slo()->set_ttft_seconds(-1); }},
  };
  for (const Case& c : cases) {
    v1::ExecuteRequest r = Valid();
    c.mutate(&r);
    auto s = ValidateExecute(r, Limits());
    ASSERT_FALSE(s.ok()) << c.field;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(s.status().message().find(c.field), std::string::npos)
        << c.field << " not in: " << s.status().message();
  }
  ModelLimits small = Limits();
  small.kv_capacity_tokens = 8;
  auto s = ValidateExecute(Valid(), small);
  EXPECT_NE(s.status().message().find("KV cache"), std::string::npos);
}

}  // namespace
}  // namespace spear::server
