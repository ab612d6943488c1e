// Bad parameters give InvalidArgument from every backend (never a crash),
// and the ISA selection API behaves.
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/cpu_features.h"
#include "kernels/ops.h"

namespace spear::kernels {
namespace {

template <class P, class RefFn, class CpuFn>
void ExpectInvalid(const P& p, RefFn ref_fn, CpuFn cpu_fn, const char* what) {
  ThreadPool pool(2);
  EXPECT_EQ(ref_fn(p).code(), absl::StatusCode::kInvalidArgument) << "ref: " << what;
  EXPECT_EQ(cpu_fn(p, nullptr).code(), absl::StatusCode::kInvalidArgument) << "cpu: " << what;
  EXPECT_EQ(cpu_fn(p, &pool).code(), absl::StatusCode::kInvalidArgument) << "cpu+pool: " << what;
}

#define EXPECT_INVALID(op, params, what) \
  ExpectInvalid(params, [](const auto& q) { return ref::op(q); }, \
                [](const auto& q, ThreadPool* tp) { return cpu::op(q, tp); }, what)

TEST(InvalidParamsTest, Linear) {
  std::vector<float> x(64), w(64), y(64);
  LinearParams good;
  good.x = x.data();
  good.m = 2;
  good.k = 4;
  good.ldx = 4;
  good.w = w.data();
  good.n = 3;
  good.y = y.data();
  good.ldy = 3;
  EXPECT_TRUE(ref::Linear(good).ok());
  EXPECT_TRUE(cpu::Linear(good, nullptr).ok());
  LinearParams p = good;
  p.x = nullptr;
  EXPECT_INVALID(Linear, p, "null x");
  p = good;
  p.w = nullptr;
  EXPECT_INVALID(Linear, p, "null w");
  p = good;
  p.y = nullptr;
  EXPECT_INVALID(Linear, p, "null y");
  p = good;
  p.ldx = 3;
  EXPECT_INVALID(Linear, p, "ldx < k");
  p = good;
  p.ldy = 2;
  EXPECT_INVALID(Linear, p, "ldy < n");
  p = good;
  p.m = -1;
  EXPECT_INVALID(Linear, p, "negative m");
  p = good;
  p.w_dtype = static_cast<DType>(7);
  EXPECT_INVALID(Linear, p, "bad dtype");
}

TEST(InvalidParamsTest, RmsNorm) {
  std::vector<float> x(64), w(64), y(64);
  RmsNormParams good;
  good.x = x.data();
  good.weight = w.data();
  good.y = y.data();
  good.m = 2;
  good.d = 8;
  good.ldx = good.ldy = 8;
  EXPECT_TRUE(cpu::RmsNorm(good, nullptr).ok());
  RmsNormParams p = good;
  p.weight = nullptr;
  EXPECT_INVALID(RmsNorm, p, "null weight");
  p = good;
  p.d = 0;
  EXPECT_INVALID(RmsNorm, p, "d = 0");
  p = good;
  p.residual = y.data();
  p.ldr = 4;
  EXPECT_INVALID(RmsNorm, p, "ldr < d");
  p = good;
  p.eps = -1.f;
  EXPECT_INVALID(RmsNorm, p, "negative eps");
}

TEST(InvalidParamsTest, Rope) {
  std::vector<float> x(64), f(8);
  std::vector<int32_t> pos(2);
  RopeParams good;
  good.x = x.data();
  good.m = 2;
  good.n_heads = 2;
  good.head_dim = 8;
  good.ldx = 16;
  good.positions = pos.data();
  good.inv_freq = f.data();
  EXPECT_TRUE(cpu::Rope(good, nullptr).ok());
  RopeParams p = good;
  p.head_dim = 7;
  p.ldx = 14;
  EXPECT_INVALID(Rope, p, "odd head_dim");
  p = good;
  p.positions = nullptr;
  EXPECT_INVALID(Rope, p, "null positions");
  p = good;
  p.ldx = 15;
  EXPECT_INVALID(Rope, p, "ldx too small");
}

TEST(InvalidParamsTest, SiluMul) {
  std::vector<float> a(64);
  SiluMulParams good;
  good.gate = good.up = a.data();
  good.y = a.data();
  good.m = 2;
  good.n = 8;
  good.ld_gate = good.ld_up = good.ldy = 8;
  EXPECT_TRUE(cpu::SiluMul(good, nullptr).ok());
  SiluMulParams p = good;
  p.up = nullptr;
  EXPECT_INVALID(SiluMul, p, "null up");
  p = good;
  p.ldy = 7;
  EXPECT_INVALID(SiluMul, p, "ldy < n");
}

TEST(InvalidParamsTest, Attention) {
  std::vector<float> q(64), kc(4 * 4 * 2 * 8), vc(kc.size()), out(64);
  std::vector<int32_t> table = {2, 0};
  AttentionParams good;
  good.q = q.data();
  good.m = 2;
  good.ldq = 32;
  good.n_heads = 4;
  good.n_kv_heads = 2;
  good.head_dim = 8;
  good.k_cache = kc.data();
  good.v_cache = vc.data();
  good.block_size = 4;
  good.block_table = table.data();
  good.num_blocks_in_table = 2;
  good.num_cache_blocks = 4;
  good.q_start = 5;  // positions 0..6 -> 2 blocks
  good.scale = 0.3f;
  good.out = out.data();
  good.ldo = 32;
  EXPECT_TRUE(ref::Attention(good).ok());
  EXPECT_TRUE(cpu::Attention(good, nullptr).ok());
  AttentionParams p = good;
  p.n_kv_heads = 3;
  EXPECT_INVALID(Attention, p, "n_heads % n_kv_heads");
  p = good;
  p.q_start = 7;  // needs 3 blocks
  EXPECT_INVALID(Attention, p, "table too short");
  p = good;
  table[1] = -1;
  EXPECT_INVALID(Attention, p, "negative block id");
  table[1] = 4;
  EXPECT_INVALID(Attention, p, "block id >= num_cache_blocks");
  table[1] = 0;
  p = good;
  p.block_table = nullptr;
  EXPECT_INVALID(Attention, p, "null table");
  p = good;
  p.ldo = 31;
  EXPECT_INVALID(Attention, p, "ldo too small");
  p = good;
  p.block_size = 0;
  EXPECT_INVALID(Attention, p, "block_size 0");
  p = good;
  p.q_start = -1;
  EXPECT_INVALID(Attention, p, "negative q_start");
}

TEST(CpuFeaturesTest, SelectionNeverExceedsDetected) {
  const Isa detected = DetectIsa();
  std::cout << "detected ISA: " << IsaName(detected) << "\n";
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const bool ok = SetIsaForTesting(isa);
    EXPECT_EQ(ok, static_cast<int>(isa) <= static_cast<int>(detected)) << IsaName(isa);
    EXPECT_LE(static_cast<int>(ActiveIsa()), static_cast<int>(detected));
    if (ok) {
      EXPECT_EQ(ActiveIsa(), isa);
    }
  }
  SetIsaForTesting(detected);
  EXPECT_EQ(IsaName(Isa::kAvx2), "avx2");
}

}  // namespace
}  // namespace spear::kernels
