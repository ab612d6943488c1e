// The fp16 decode-step ops of cuda_ops.h (RMSNorm to fp16, RoPE, SwiGLU, KV
// append, paged decode attention, embedding, argmax) against the scalar
// reference of kernels/ops.h (or a plain loop where ops.h has no such op),
// on fresh random inputs (the seed is printed) and awkward shapes. Outputs
// are poisoned (NaN) before every launch; padding columns must survive.
// Labelled `gpu`; each test skips with a message when no device is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu_skip.h"
#include "kernels/cuda_ops.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"

namespace spear::kernels {
namespace {

constexpr uint16_t kHalfNaN = 0x7e00;

template <typename T>
class Dev {
 public:
  explicit Dev(size_t n) : n_(std::max<size_t>(n, 1)) {
    EXPECT_EQ(cudaMalloc(&p_, n_ * sizeof(T)), cudaSuccess);
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) { Up(v); }
  ~Dev() { cudaFree(p_); }
  T* get() { return p_; }
  void Up(const std::vector<T>& v) {
    EXPECT_EQ(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Down(size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(v.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  void Poison() { EXPECT_EQ(cudaMemset(p_, 0xff, n_ * sizeof(T)), cudaSuccess); }  // NaN / -1

 private:
  size_t n_;
  T* p_ = nullptr;
};

std::mt19937 Rng() {
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  return std::mt19937(seed);
}

// Random fp16 values (normal * scale), returned as bits; `f` gets the exact
// float values the device sees.
std::vector<uint16_t> RandHalf(size_t n, std::mt19937& rng, float scale, std::vector<float>* f) {
  std::normal_distribution<float> nd;
  std::vector<uint16_t> h(n);
  if (f) f->resize(n);
  for (size_t i = 0; i < n; ++i) {
    h[i] = FloatToHalf(nd(rng) * scale);
    if (f) (*f)[i] = HalfToFloat(h[i]);
  }
  return h;
}

TEST(CudaDecodeOps, RmsNormF16MatchesReference) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  std::normal_distribution<float> nd;
  for (int64_t m : {1, 3, 17, 65}) {
    // d % 4 == 0 with aligned strides takes the vectorised path (1, 2, 4 or
    // 8 float4 per thread); 4097 and the odd ldy the generic one.
    for (int64_t d : {64, 576, 2048, 4096, 6000, 4097}) {
      for (bool with_residual : {false, true}) {
        const int64_t ldy = d % 4 == 0 ? d + 8 : d + 5;
        std::vector<float> x(m * d), r(m * d), w(d);
        for (auto* v : {&x, &r, &w})
          for (float& e : *v) e = nd(rng);
        std::vector<float> r_ref = r, y_ref(m * d);
        RmsNormParams p;
        p.x = x.data();
        p.residual = with_residual ? r_ref.data() : nullptr;
        p.weight = w.data();
        p.y = y_ref.data();
        p.m = m;
        p.d = p.ldx = p.ldr = p.ldy = d;
        ASSERT_TRUE(ref::RmsNorm(p).ok());
        Dev<float> dx(x), dr(r), dw(w);
        Dev<uint16_t> dy(m * ldy);
        dy.Poison();
        cuda::RmsNormF16Params q;
        q.x = dx.get();
        q.residual = with_residual ? dr.get() : nullptr;
        q.weight = dw.get();
        q.y = dy.get();
        q.m = m;
        q.d = q.ldx = q.ldr = d;
        q.ldy = ldy;
        q.eps = p.eps;
        q.early_trigger = m % 2 == 1;  // v30's trigger order (a plain launch: same results)
        ASSERT_TRUE(cuda::RmsNormF16(q, nullptr).ok());
        const auto y = dy.Down(m * ldy);
        const auto r_out = dr.Down(m * d);
        // Tolerance: fp16 rounding of the output (2^-11 relative) plus fp32
        // sums in another order: |a - b| <= 1e-3 |ref| + 1e-5.
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < d; ++j) {
            const float ref = y_ref[i * d + j];
            ASSERT_NEAR(HalfToFloat(y[i * ldy + j]), ref, 1e-3 * std::fabs(ref) + 1e-5)
                << "m=" << m << " d=" << d << " res=" << with_residual << " i=" << i << " j=" << j;
            if (with_residual) {
              ASSERT_NEAR(r_out[i * d + j], r_ref[i * d + j],
                          1e-6 * (1 + std::fabs(r_ref[i * d + j])));
            }
          }
          for (int64_t j = d; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], 0xffff) << "padding written";
        }
      }
    }
  }
}

TEST(CudaDecodeOps, RopeMatchesReference) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  struct Case {
    int n_heads, head_dim;
  };
  for (Case c : {Case{40, 128}, Case{12, 64}, Case{3, 128}}) {
    for (int64_t m : {1, 3, 17, 65}) {
      const int64_t width = int64_t{c.n_heads} * c.head_dim, ldx = width + 2 * c.head_dim;
      std::vector<float> xf;
      std::vector<uint16_t> x = RandHalf(m * ldx, rng, 1.f, &xf);
      std::vector<int32_t> pos(m);
      for (auto& p : pos) p = static_cast<int32_t>(rng() % 131072);
      pos[0] = 0;
      std::vector<float> inv(c.head_dim / 2);
      for (int j = 0; j < c.head_dim / 2; ++j)
        inv[j] = 1.f / std::pow(500000.f, 2.f * j / static_cast<float>(c.head_dim));
      const float scaling = (m == 3) ? 1.25f : 1.f;
      std::vector<float> ref = xf;
      RopeParams p;
      p.x = ref.data();
      p.m = m;
      p.ldx = ldx;
      p.n_heads = c.n_heads;
      p.head_dim = c.head_dim;
      p.positions = pos.data();
      p.inv_freq = inv.data();
      p.attention_scaling = scaling;
      ASSERT_TRUE(ref::Rope(p).ok());
      // The padding columns hold NaN: they must stay untouched.
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = width; j < ldx; ++j) x[i * ldx + j] = kHalfNaN;
      Dev<uint16_t> dx(x);
      Dev<int32_t> dp(pos);
      Dev<float> di(inv);
      cuda::RopeF16Params q;
      q.x = dx.get();
      q.m = m;
      q.ldx = ldx;
      q.n_heads = c.n_heads;
      q.head_dim = c.head_dim;
      q.positions = dp.get();
      q.inv_freq = di.get();
      q.attention_scaling = scaling;
      ASSERT_TRUE(cuda::Rope(q, nullptr).ok());
      const auto y = dx.Down(m * ldx);
      // Tolerance: fp16 output rounding + sin/cos of angles up to ~1.3e5 rad
      // (both sides fully range-reduced): 2e-3 (1 + |ref|).
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < width; ++j) {
          const float r = ref[i * ldx + j];
          ASSERT_NEAR(HalfToFloat(y[i * ldx + j]), r, 2e-3 * (1 + std::fabs(r)))
              << "heads=" << c.n_heads << " D=" << c.head_dim << " m=" << m << " i=" << i
              << " j=" << j << " pos=" << pos[i];
        }
        for (int64_t j = width; j < ldx; ++j) ASSERT_EQ(y[i * ldx + j], kHalfNaN);
      }
    }
  }
}

TEST(CudaDecodeOps, SiluMulOnGateUpLayout) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  for (int64_t m : {1, 3, 17, 65}) {
    for (int64_t f : {1, 100, 1792}) {
      // The gate_up GEMM output [m, 2F]: gate columns, then up columns.
      std::vector<float> gu_f;
      const auto gu = RandHalf(m * 2 * f, rng, 3.f, &gu_f);
      const int64_t ldy = f + 3;
      std::vector<float> ref(m * f);
      SiluMulParams p;
      p.gate = gu_f.data();
      p.up = gu_f.data() + f;
      p.y = ref.data();
      p.m = m;
      p.n = f;
      p.ld_gate = p.ld_up = 2 * f;
      p.ldy = f;
      ASSERT_TRUE(ref::SiluMul(p).ok());
      Dev<uint16_t> dgu(gu), dy(m * ldy);
      dy.Poison();
      cuda::SiluMulF16Params q;
      q.gate = dgu.get();
      q.up = dgu.get() + f;
      q.y = dy.get();
      q.m = m;
      q.n = f;
      q.ld_gate = q.ld_up = 2 * f;
      q.ldy = ldy;
      ASSERT_TRUE(cuda::SiluMul(q, nullptr).ok());
      const auto y = dy.Down(m * ldy);
      // Tolerance: fp16 output rounding: 1e-3 |ref| + 1e-5.
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < f; ++j) {
          const float r = ref[i * f + j];
          ASSERT_NEAR(HalfToFloat(y[i * ldy + j]), r, 1e-3 * std::fabs(r) + 1e-5)
              << "m=" << m << " F=" << f << " i=" << i << " j=" << j;
        }
        for (int64_t j = f; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], 0xffff);
      }
    }
  }
}

TEST(CudaDecodeOps, KvAppendWritesExactlyItsSlots) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  for (int head_dim : {64, 128}) {
    for (int n_kv : {1, 8}) {
      for (int64_t m : {1, 3, 17, 65}) {
        const int bs = 16;
        const int64_t blocks = 20, row = int64_t{n_kv} * head_dim;
        const int64_t ld = 3 * row;  // k and v inside a qkv-like row
        const auto kv = RandHalf(m * ld, rng, 1.f, nullptr);
        std::vector<int32_t> perm(blocks * bs);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        std::vector<int32_t> slots(perm.begin(), perm.begin() + m);
        if (m > 2) slots[1] = -1;                                 // padding token: skipped
        if (m > 3) slots[2] = static_cast<int32_t>(blocks * bs);  // out of range: skipped
        Dev<uint16_t> dkv(kv), kc(blocks * bs * row), vc(blocks * bs * row);
        kc.Poison();
        vc.Poison();
        Dev<int32_t> ds(slots);
        cuda::KvAppendParams p;
        p.k = dkv.get() + row;
        p.v = dkv.get() + 2 * row;
        p.m = m;
        p.ldk = p.ldv = ld;
        p.n_kv_heads = n_kv;
        p.head_dim = head_dim;
        p.slots = ds.get();
        p.k_cache = kc.get();
        p.v_cache = vc.get();
        p.block_size = bs;
        p.num_cache_blocks = blocks;
        ASSERT_TRUE(cuda::KvAppend(p, nullptr).ok());
        const auto k_out = kc.Down(blocks * bs * row), v_out = vc.Down(blocks * bs * row);
        std::vector<int> owner(blocks * bs, -1);
        for (int64_t i = 0; i < m; ++i)
          if (slots[i] >= 0 && slots[i] < blocks * bs) owner[slots[i]] = static_cast<int>(i);
        for (int64_t s = 0; s < blocks * bs; ++s) {
          for (int64_t j = 0; j < row; ++j) {
            const uint16_t ek = owner[s] < 0 ? 0xffff : kv[owner[s] * ld + row + j];
            const uint16_t ev = owner[s] < 0 ? 0xffff : kv[owner[s] * ld + 2 * row + j];
            ASSERT_EQ(k_out[s * row + j], ek) << "slot " << s << " j " << j;
            ASSERT_EQ(v_out[s * row + j], ev) << "slot " << s << " j " << j;
          }
        }
      }
    }
  }
}

// RopeKvAppend = Rope (q and k heads) then KvAppend (rotated k, v) in one
// launch: q and k against ref::Rope, the v part of the row untouched, the
// caches holding exactly the row's rotated k and its v at the token's slot
// and poison everywhere else (padding / out-of-range slots skipped).
TEST(CudaDecodeOps, RopeKvAppendMatchesRopeThenAppend) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  struct Case {
    int n_q, n_kv, head_dim, pad;  // pad: extra columns after v (odd: scalar v copy)
  };
  for (Case c : {Case{32, 8, 128, 8}, Case{9, 3, 64, 0}, Case{12, 1, 64, 3}, Case{6, 2, 64, 1},
                 Case{4, 4, 128, 0}}) {
    for (int64_t m : {1, 3, 17, 65}) {
      const int D = c.head_dim, bs = 16;
      const int64_t qd = int64_t{c.n_q} * D, row = int64_t{c.n_kv} * D;
      const int64_t width = qd + 2 * row, ldx = width + c.pad;
      const int64_t blocks = (m + bs - 1) / bs + 5, slots_n = blocks * bs;
      std::vector<float> xf;
      std::vector<uint16_t> x = RandHalf(m * ldx, rng, 1.f, &xf);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = width; j < ldx; ++j) x[i * ldx + j] = kHalfNaN;
      std::vector<int32_t> pos(m);
      for (auto& v : pos) v = static_cast<int32_t>(rng() % 131072);
      pos[0] = 0;
      std::vector<int32_t> perm(slots_n);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<int32_t> slots(perm.begin(), perm.begin() + m);
      if (m > 2) slots[1] = -1;                                  // padding token: skipped
      if (m > 3) slots[2] = static_cast<int32_t>(slots_n);       // out of range: skipped
      std::vector<float> inv(D / 2);
      for (int j = 0; j < D / 2; ++j) inv[j] = 1.f / std::pow(500000.f, 2.f * j / D);
      const float scaling = (m == 3) ? 1.25f : 1.f;
      std::vector<float> ref = xf;
      RopeParams rp;
      rp.x = ref.data();
      rp.m = m;
      rp.ldx = ldx;
      rp.n_heads = c.n_q + c.n_kv;
      rp.head_dim = D;
      rp.positions = pos.data();
      rp.inv_freq = inv.data();
      rp.attention_scaling = scaling;
      ASSERT_TRUE(ref::Rope(rp).ok());
      Dev<uint16_t> dx(x), kc(slots_n * row), vc(slots_n * row);
      kc.Poison();
      vc.Poison();
      Dev<int32_t> dp(pos), ds(slots);
      Dev<float> di(inv);
      cuda::RopeKvAppendParams q;
      q.qkv = dx.get();
      q.m = m;
      q.ldqkv = ldx;
      q.n_q_heads = c.n_q;
      q.n_kv_heads = c.n_kv;
      q.head_dim = D;
      q.positions = dp.get();
      q.inv_freq = di.get();
      q.attention_scaling = scaling;
      q.slots = ds.get();
      q.k_cache = kc.get();
      q.v_cache = vc.get();
      q.block_size = bs;
      q.num_cache_blocks = blocks;
      ASSERT_TRUE(cuda::RopeKvAppend(q, nullptr).ok());
      const auto y = dx.Down(m * ldx);
      const auto k_out = kc.Down(slots_n * row), v_out = vc.Down(slots_n * row);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < qd + row; ++j) {  // q and k rotated: tolerance as Rope
          const float r = ref[i * ldx + j];
          ASSERT_NEAR(HalfToFloat(y[i * ldx + j]), r, 2e-3 * (1 + std::fabs(r)))
              << "n_q=" << c.n_q << " n_kv=" << c.n_kv << " D=" << D << " m=" << m << " i=" << i
              << " j=" << j;
        }
        for (int64_t j = qd + row; j < ldx; ++j) ASSERT_EQ(y[i * ldx + j], x[i * ldx + j]);
      }
      std::vector<int> owner(slots_n, -1);
      for (int64_t i = 0; i < m; ++i)
        if (slots[i] >= 0 && slots[i] < slots_n) owner[slots[i]] = static_cast<int>(i);
      for (int64_t s = 0; s < slots_n; ++s) {
        for (int64_t j = 0; j < row; ++j) {
          const uint16_t ek = owner[s] < 0 ? 0xffff : y[owner[s] * ldx + qd + j];
          const uint16_t ev = owner[s] < 0 ? 0xffff : x[owner[s] * ldx + qd + row + j];
          ASSERT_EQ(k_out[s * row + j], ek) << "slot " << s << " j " << j << " m=" << m;
          ASSERT_EQ(v_out[s * row + j], ev) << "slot " << s << " j " << j << " m=" << m;
        }
      }
    }
  }
  cuda::RopeKvAppendParams bad;
  EXPECT_EQ(cuda::RopeKvAppend(bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

struct AttnCase {
  int n_kv, group, head_dim;
  std::vector<int> ctx;  // per sequence
  int cluster = -1;      // 1 / 0: the call must / must not take the cluster combine (v50)
};

int g_cluster_max = 8;  // PagedDecodeAttentionParams::cluster_max of RunAttention

void RunAttention(const AttnCase& c, std::mt19937& rng) {
  const int n_heads = c.n_kv * c.group, D = c.head_dim, bs = 16;
  const int64_t seqs = static_cast<int64_t>(c.ctx.size());
  const int max_ctx = *std::max_element(c.ctx.begin(), c.ctx.end());
  const int64_t max_blocks = (max_ctx + bs - 1) / bs + 1;  // one spare column
  int64_t need = 0;
  for (int l : c.ctx) need += (l + bs - 1) / bs;
  const int64_t num_blocks = need + 7;
  const int64_t row = int64_t{c.n_kv} * D;
  std::vector<float> kf, vf, qf;
  const auto k = RandHalf(num_blocks * bs * row, rng, 1.f, &kf);
  const auto v = RandHalf(num_blocks * bs * row, rng, 1.f, &vf);
  // q inside a fused qkv row: stride (n_heads + 2 n_kv) D.
  const int64_t ldq = int64_t{n_heads + 2 * c.n_kv} * D, ldo = int64_t{n_heads} * D + 8;
  const auto q = RandHalf(seqs * ldq, rng, 1.f, &qf);
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(seqs * max_blocks, -1), lens(c.ctx.begin(), c.ctx.end());
  int64_t next = 0;
  for (int64_t s = 0; s < seqs; ++s)
    for (int64_t b = 0; b < (c.ctx[s] + bs - 1) / bs; ++b)
      tables[s * max_blocks + b] = perm[next++];
  const float scale = 1.f / std::sqrt(static_cast<float>(D));

  std::vector<float> ref(seqs * n_heads * D, 0.f);
  for (int64_t s = 0; s < seqs; ++s) {
    if (c.ctx[s] == 0) continue;  // no keys: the op defines a zero row
    AttentionParams p;
    p.q = qf.data() + s * ldq;
    p.m = 1;
    p.ldq = ldq;
    p.n_heads = n_heads;
    p.n_kv_heads = c.n_kv;
    p.head_dim = D;
    p.k_cache = kf.data();
    p.v_cache = vf.data();
    p.block_size = bs;
    p.block_table = tables.data() + s * max_blocks;
    p.num_blocks_in_table = (c.ctx[s] + bs - 1) / bs;
    p.num_cache_blocks = num_blocks;
    p.q_start = c.ctx[s] - 1;
    p.scale = scale;
    p.out = ref.data() + s * n_heads * D;
    p.ldo = n_heads * D;
    ASSERT_TRUE(ref::Attention(p).ok());
  }

  Dev<uint16_t> dq(q), dk(k), dv(v), dout(seqs * ldo);
  Dev<int32_t> dt(tables), dl(lens);
  dout.Poison();
  cuda::PagedDecodeAttentionParams p;
  p.q = dq.get();
  p.num_seqs = seqs;
  p.ldq = ldq;
  p.n_heads = n_heads;
  p.n_kv_heads = c.n_kv;
  p.head_dim = D;
  p.k_cache = dk.get();
  p.v_cache = dv.get();
  p.block_size = bs;
  p.num_cache_blocks = num_blocks;
  p.block_tables = dt.get();
  p.max_blocks_per_seq = max_blocks;
  p.context_lens = dl.get();
  p.max_context_len = max_ctx;
  p.scale = scale;
  p.out = dout.get();
  p.ldo = ldo;
  p.cluster_max = g_cluster_max;
  const size_t ws = cuda::PagedDecodeAttentionWorkspaceBytes(p);
  Dev<float> dws(ws / 4 + 1);
  p.workspace = ws ? dws.get() : nullptr;
  p.workspace_bytes = ws;
  const bool cluster = cuda::PagedDecodeAttentionCombinesInCluster(p);
  if (c.cluster >= 0) {
    ASSERT_EQ(cluster, c.cluster == 1) << "cluster_max " << p.cluster_max;
  }
  if (ws > 0) {  // a missing workspace is refused, not a crash (forms that use it)
    cuda::PagedDecodeAttentionParams bad = p;
    bad.workspace = nullptr;
    bad.cluster_combine = false;
    ASSERT_EQ(cuda::PagedDecodeAttention(bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
  }
  {  // v52: the row prefetch's automatic rule and its bad values
    cuda::PagedDecodeAttentionParams q = p;
    ASSERT_EQ(cuda::PagedDecodeAttentionPrefetchesRows(q),
              seqs * c.n_kv * D * 4 <= cuda::PagedDecodeAttentionParams::kPrefetchRowBytes);
    q.prefetch_rows = 1;
    ASSERT_TRUE(cuda::PagedDecodeAttentionPrefetchesRows(q));
    q.prefetch_rows = 2;
    ASSERT_FALSE(cuda::PagedDecodeAttentionPrefetchesRows(q));
    for (int v : {-1, 3}) {
      q.prefetch_rows = v;
      ASSERT_EQ(cuda::PagedDecodeAttention(q, nullptr).code(), absl::StatusCode::kInvalidArgument);
    }
  }
  // The three combine paths: the second kernel (run 0, no tickets), the
  // combine in the split launch by tickets (runs 1-3), the cluster combine
  // (runs 4-6, v50, without a workspace where it applies): bitwise equal
  // within a path each time (fixed orders), the tickets back at zero after
  // each ticketed run. Within each path the runs alternate v52's row
  // prefetch before the dependency wait (never / always), which must give
  // the same bits.
  const int64_t nt = cuda::PagedDecodeAttentionTickets(p);
  ASSERT_EQ(nt, seqs * c.n_kv * ((c.group + 7) / 8));
  Dev<int32_t> dtk(nt);
  ASSERT_EQ(cudaMemset(dtk.get(), 0, std::max<int64_t>(nt, 1) * sizeof(int32_t)), cudaSuccess);
  std::vector<uint16_t> first_fused, first_cluster;
  for (int run = 0; run < 7; ++run) {
    const bool fused = run >= 1 && run <= 3, in_cluster = run >= 4;
    if (in_cluster && !cluster) break;
    p.tickets = fused ? dtk.get() : nullptr;
    p.cluster_combine = in_cluster;
    p.prefetch_rows = run % 2 == 0 ? 1 : 2;
    p.workspace = in_cluster || ws == 0 ? nullptr : dws.get();
    p.workspace_bytes = in_cluster ? 0 : ws;
    dws.Poison();
    dout.Poison();
    ASSERT_TRUE(cuda::PagedDecodeAttention(p, nullptr).ok()) << "run " << run;
    const auto out = dout.Down(seqs * ldo);
    // Tolerance: fp16 output rounding and fp32 softmax/accumulation against
    // the reference's double: |a - b| <= 2e-3 (1 + |ref|) (outputs are
    // convex combinations of N(0,1) values, so |ref| <~ 3).
    for (int64_t s = 0; s < seqs; ++s) {
      for (int64_t j = 0; j < n_heads * D; ++j) {
        const float r = ref[s * n_heads * D + j];
        ASSERT_NEAR(HalfToFloat(out[s * ldo + j]), r, 2e-3 * (1 + std::fabs(r)))
            << "kv=" << c.n_kv << " group=" << c.group << " D=" << D << " seqs=" << seqs
            << " seq=" << s << " ctx=" << c.ctx[s] << " j=" << j << " ws=" << ws
            << " fused=" << fused << " cluster=" << in_cluster << " run=" << run
            << " prefetch=" << p.prefetch_rows;
      }
      for (int64_t j = n_heads * D; j < ldo; ++j) ASSERT_EQ(out[s * ldo + j], 0xffff);
    }
    if (in_cluster) {
      if (run == 4) {
        first_cluster = out;
      } else {
        ASSERT_TRUE(out == first_cluster) << "cluster combine not deterministic, run " << run;
      }
      continue;
    }
    if (!fused) continue;
    const auto tk = dtk.Down(nt);
    for (int64_t i = 0; i < nt; ++i) ASSERT_EQ(tk[i], 0) << "ticket " << i << " run " << run;
    if (run == 1) {
      first_fused = out;
    } else {
      ASSERT_TRUE(out == first_fused) << "fused combine not deterministic, run " << run;
    }
  }
}

// Which calls take the cluster combine (v50): several partitions, at most
// cluster_max (default 8; the device's cap, 16 on the H100 / H200, applies
// too), none longer than 64 tokens or than the split's own partitions
// (MakePlan: two waves of blocks, 32..512 tokens). 8 kv heads x 4.
TEST(CudaDecodeOps, PagedDecodeAttentionClusterPlan) {
  SKIP_WITHOUT_GPU();
  cuda::PagedDecodeAttentionParams p;
  p.q = p.k_cache = p.v_cache = p.out = reinterpret_cast<uint16_t*>(16);
  p.block_tables = p.context_lens = reinterpret_cast<const int32_t*>(16);
  p.n_heads = 32;
  p.n_kv_heads = 8;
  p.head_dim = 128;
  p.ldq = p.ldo = 32 * 128;
  p.block_size = 16;
  p.num_cache_blocks = 1 << 16;
  p.max_blocks_per_seq = 1024;
  p.scale = 1.f;
  auto in_cluster = [&](int64_t seqs, int64_t ctx, int cmax) {
    p.num_seqs = seqs;
    p.max_context_len = ctx;
    p.cluster_max = cmax;
    return cuda::PagedDecodeAttentionCombinesInCluster(p);
  };
  // Batch 1 (the split's partitions: 32 tokens): up to cluster_max x 64.
  EXPECT_FALSE(in_cluster(1, 16, 8));  // one partition
  EXPECT_TRUE(in_cluster(1, 512, 8));  // 8 x 64
  EXPECT_FALSE(in_cluster(1, 513, 8));
  EXPECT_FALSE(in_cluster(1, 2048, 8));  // 8 x 256: measured slower
  EXPECT_TRUE(in_cluster(1, 1024, 16));  // 16 x 64
  EXPECT_FALSE(in_cluster(1, 1025, 16));
  EXPECT_TRUE(in_cluster(1, 128, 2));
  EXPECT_FALSE(in_cluster(1, 129, 2));
  // Batch 8 (the split's partitions: ctx / 5): the same partitions, <= 512.
  EXPECT_TRUE(in_cluster(8, 512, 8));    // 4 x 128
  EXPECT_TRUE(in_cluster(8, 2560, 8));   // 5 x 512
  EXPECT_FALSE(in_cluster(8, 2561, 8));  // more than 512 a partition
  EXPECT_TRUE(in_cluster(8, 512, 4));    // 4 x 128
  EXPECT_FALSE(in_cluster(8, 512, 2));   // 2 x 256: longer than the split's
  EXPECT_FALSE(in_cluster(64, 512, 8));  // 512 blocks without splitting
  p.cluster_combine = false;
  EXPECT_FALSE(in_cluster(1, 512, 8));
  p.cluster_combine = true;
  for (int bad : {0, 1, 17}) {
    EXPECT_FALSE(in_cluster(1, 512, bad));
    EXPECT_EQ(cuda::PagedDecodeAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

// The cluster combine with every cluster cap (2, 4, 8, 16 partitions of 64
// tokens; a batch with an empty and a short sequence; a batch of 17 in
// clusters of 2), against the reference; small enough for the sanitizers.
TEST(CudaDecodeOps, PagedDecodeAttentionClusterCaps) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  std::uniform_int_distribution<int> len(1, 700);
  for (int cmax : {2, 4, 8, 16}) {
    g_cluster_max = cmax;
    RunAttention({8, 4, 128, {64 * cmax}, 1}, rng);
    RunAttention({2, 4, 64, {64 * cmax, 0, 33}, 1}, rng);
  }
  g_cluster_max = 8;
  std::vector<int> b17(17);
  for (int& l : b17) l = len(rng);
  b17[3] = 700;  // the split's partitions: 350 -> 352 tokens, 2 of them
  RunAttention({8, 4, 128, b17, 1}, rng);
}

TEST(CudaDecodeOps, PagedDecodeAttentionMatchesReference) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  std::uniform_int_distribution<int> len(1, 700);
  for (int D : {64, 128}) {
    for (int group : {1, 4, 8}) {
      for (int n_kv : {1, 2, 8}) {
        // Batch 1: many partitions (split-K + combine); lengths off the block size.
        for (int l : {1, 15, 17, 513, 2049}) RunAttention({n_kv, group, D, {l}}, rng);
        // Batches 3 and 17 with mixed lengths (one empty sequence).
        std::vector<int> b3 = {len(rng), 0, 33};
        RunAttention({n_kv, group, D, b3}, rng);
        std::vector<int> b17(17);
        for (int& l : b17) l = len(rng);
        RunAttention({n_kv, group, D, b17}, rng);
      }
    }
    // Batch 65 x 8 kv heads fills the GPU: one partition, direct output.
    std::vector<int> b65(65);
    for (int& l : b65) l = len(rng);
    RunAttention({8, 4, D, b65}, rng);
    // A GQA ratio above the per-block head chunk (12 = 8 + 4).
    RunAttention({2, 12, D, {300, 5}}, rng);
    // The cluster combine's bound at batch 1: 8 partitions of 64 tokens by
    // default (512 in a cluster, one more token by the combine kernel), 16
    // with cluster_max 16.
    RunAttention({1, 4, D, {512}, 1}, rng);
    RunAttention({1, 4, D, {513}, 0}, rng);
    g_cluster_max = 16;
    RunAttention({1, 4, D, {1024}, 1}, rng);
    RunAttention({1, 4, D, {1025}, 0}, rng);
    g_cluster_max = 8;
  }
}

// Past 512 partitions (a context over 256K tokens at batch 1) the combine's
// weights no longer fit the split block's buffer: with tickets given, the
// separate combine kernel must still run (RunAttention checks both paths).
TEST(CudaDecodeOps, PagedDecodeAttentionLongContextCombines) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  RunAttention({1, 1, 64, {270000}}, rng);  // 528 partitions of 512
}

TEST(CudaDecodeOps, PagedDecodeAttentionRejectsBadParams) {
  SKIP_WITHOUT_GPU();
  cuda::PagedDecodeAttentionParams p;
  EXPECT_EQ(cuda::PagedDecodeAttention(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// Programmatic dependent launch (cuda_ops.h): a chain in which every op reads
// what the op before it wrote (RoPE in place -> KV append -> paged attention
// over the appended rows -> SwiGLU of the attention output back into q ->
// the next RoPE ...), captured into a graph on a non-blocking stream, must
// give bitwise what the same chain gives with plain launches. A kernel that
// touched memory before its griddepcontrol.wait would read stale values.
TEST(CudaDecodeOps, ProgrammaticLaunchChainMatchesPlainLaunches) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  const int n_heads = 8, n_kv = 2, D = 64, bs = 16, steps = 12;
  const int64_t m = 3, qn = int64_t{n_heads} * D, row = int64_t{n_kv} * D;
  const int64_t ldq = qn + 2 * row, blocks = m * 4;
  const auto qkv0 = RandHalf(m * ldq, rng, 1.f, nullptr);
  const auto cache0 = RandHalf(blocks * bs * row, rng, 1.f, nullptr);
  std::vector<int32_t> tables(blocks), lens(m, 40), pos(m);
  std::iota(tables.begin(), tables.end(), 0);
  std::shuffle(tables.begin(), tables.end(), rng);
  std::vector<float> inv(D / 2);
  for (int j = 0; j < D / 2; ++j) inv[j] = std::pow(10000.f, -2.f * j / D);
  Dev<int32_t> dt(tables), dl(lens), dpos(pos), dslots(std::vector<int32_t>{0, 1, 2});
  Dev<float> dinv(inv);
  // The RMSNorm of each step: fp32 x [m][qn] added into a residual in place,
  // normalised into q (so the next step's RoPE and attention read it).
  std::normal_distribution<float> nd;
  std::vector<float> nx(m * qn), res0(m * qn), nw(qn);
  for (float& v : nx) v = nd(rng);
  for (float& v : res0) v = nd(rng);
  for (float& v : nw) v = 1.f + 0.1f * nd(rng);
  Dev<float> dnx(nx), dnw(nw);
  auto run = [&](bool pdl, bool fused, bool early) {
    Dev<uint16_t> qkv(qkv0), kc(cache0), vc(cache0), out(m * qn);
    Dev<float> res(res0);
    out.Poison();
    cuda::PagedDecodeAttentionParams ap;
    ap.q = qkv.get();
    ap.num_seqs = m;
    ap.ldq = ldq;
    ap.n_heads = n_heads;
    ap.n_kv_heads = n_kv;
    ap.head_dim = D;
    ap.k_cache = kc.get();
    ap.v_cache = vc.get();
    ap.block_size = bs;
    ap.num_cache_blocks = blocks;
    ap.block_tables = dt.get();
    ap.max_blocks_per_seq = 4;
    ap.context_lens = dl.get();
    ap.max_context_len = 4 * bs;
    ap.scale = 0.125f;
    ap.out = out.get();
    ap.ldo = qn;
    Dev<uint8_t> ws(cuda::PagedDecodeAttentionWorkspaceBytes(ap));
    ap.workspace = ws.get();
    ap.workspace_bytes = cuda::PagedDecodeAttentionWorkspaceBytes(ap);
    Dev<int32_t> tk(cuda::PagedDecodeAttentionTickets(ap));
    EXPECT_EQ(cudaMemset(tk.get(), 0, cuda::PagedDecodeAttentionTickets(ap) * 4), cudaSuccess);
    ap.tickets = fused ? tk.get() : nullptr;
    ap.early_trigger = early;
    cudaStream_t st;
    EXPECT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    cuda::SetProgrammaticLaunch(pdl);
    cudaGraph_t g;
    EXPECT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    for (int it = 0; it < steps; ++it) {
      if (fused) {  // RoPE + KV append in one launch
        cuda::RopeKvAppendParams f;
        f.qkv = qkv.get();
        f.m = m;
        f.ldqkv = ldq;
        f.n_q_heads = n_heads;
        f.n_kv_heads = n_kv;
        f.head_dim = D;
        f.positions = dpos.get();
        f.inv_freq = dinv.get();
        f.slots = dslots.get();
        f.k_cache = kc.get();
        f.v_cache = vc.get();
        f.block_size = bs;
        f.num_cache_blocks = blocks;
        EXPECT_TRUE(cuda::RopeKvAppend(f, st).ok());
      }
      cuda::RopeF16Params r;
      r.x = qkv.get();
      r.m = m;
      r.ldx = ldq;
      r.n_heads = n_heads + n_kv;
      r.head_dim = D;
      r.positions = dpos.get();
      r.inv_freq = dinv.get();
      if (!fused) {
        EXPECT_TRUE(cuda::Rope(r, st).ok());
      }
      cuda::KvAppendParams a;
      a.k = qkv.get() + qn;
      a.v = qkv.get() + qn + row;
      a.m = m;
      a.ldk = a.ldv = ldq;
      a.n_kv_heads = n_kv;
      a.head_dim = D;
      a.slots = dslots.get();  // rows 0..2 of physical block 0
      a.k_cache = kc.get();
      a.v_cache = vc.get();
      a.block_size = bs;
      a.num_cache_blocks = blocks;
      if (!fused) {
        EXPECT_TRUE(cuda::KvAppend(a, st).ok());
      }
      EXPECT_TRUE(cuda::PagedDecodeAttention(ap, st).ok());
      cuda::SiluMulF16Params sm;
      sm.gate = out.get();
      sm.up = out.get();
      sm.y = qkv.get();
      sm.m = m;
      sm.n = qn;
      sm.ld_gate = sm.ld_up = qn;
      sm.ldy = ldq;
      sm.early_trigger = early;
      EXPECT_TRUE(cuda::SiluMul(sm, st).ok());
      cuda::RmsNormF16Params n;
      n.x = dnx.get();
      n.residual = res.get();
      n.weight = dnw.get();
      n.y = qkv.get();
      n.m = m;
      n.d = n.ldx = n.ldr = qn;
      n.ldy = ldq;
      n.early_trigger = early;
      EXPECT_TRUE(cuda::RmsNormF16(n, st).ok());
    }
    EXPECT_EQ(cudaStreamEndCapture(st, &g), cudaSuccess);
    cuda::SetProgrammaticLaunch(true);
    cudaGraphExec_t ge;
    EXPECT_EQ(cudaGraphInstantiate(&ge, g, 0), cudaSuccess);
    EXPECT_EQ(cudaGraphLaunch(ge, st), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    EXPECT_EQ(cudaGraphExecDestroy(ge), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(g), cudaSuccess);
    EXPECT_EQ(cudaStreamDestroy(st), cudaSuccess);
    std::vector<uint16_t> all = qkv.Down(m * ldq);
    const std::vector<uint16_t> o = out.Down(m * qn), k = kc.Down(blocks * bs * row);
    all.insert(all.end(), o.begin(), o.end());
    all.insert(all.end(), k.begin(), k.end());
    const std::vector<float> r = res.Down(m * qn);  // its bits, as fp16 pairs
    const auto* rb = reinterpret_cast<const uint16_t*>(r.data());
    all.insert(all.end(), rb, rb + 2 * r.size());
    return all;
  };
  // Unfused (RoPE, KV append, split + combine kernel) and fused (RopeKvAppend,
  // the combine inside the split launch): each with PDL bitwise equal to
  // plain launches, and so with the attention, SwiGLU and RMSNorm (its
  // residual updated in place, step after step) triggering the next launch
  // before their own wait (v30's early_trigger).
  for (bool fused : {false, true}) {
    const std::vector<uint16_t> plain = run(false, fused, false);
    for (bool early : {false, true}) {
      const std::vector<uint16_t> pdl = run(true, fused, early);
      ASSERT_EQ(plain.size(), pdl.size());
      // The fp16 outputs come first (qkv, attention, K cache); the residual's
      // fp32 bits after them are compared, not checked for fp16 NaN patterns.
      const size_t n16 = static_cast<size_t>(m * ldq + m * qn + blocks * bs * row);
      size_t nan = 0;
      for (size_t i = 0; i < plain.size(); ++i) {
        ASSERT_EQ(plain[i], pdl[i]) << "element " << i << " fused " << fused << " early " << early;
        if (i < n16) nan += (plain[i] & 0x7c00) == 0x7c00;
      }
      EXPECT_EQ(nan, 0u) << "the chain must write every output (poisoned first), fused " << fused;
    }
  }
}

TEST(CudaDecodeOps, EmbeddingLooksUpRows) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  const int64_t vocab = 1000;
  for (int64_t d : {64, 4097}) {
    for (int64_t m : {1, 3, 17, 65}) {
      std::vector<float> tf;
      const auto table = RandHalf(vocab * d, rng, 1.f, &tf);
      std::vector<int32_t> ids(m);
      for (auto& i : ids) i = static_cast<int32_t>(rng() % vocab);
      if (m > 2) {
        ids[1] = -1;
        ids[2] = static_cast<int32_t>(vocab);
      }
      const int64_t ldy = d + 4;
      Dev<uint16_t> dt(table), y16(m * ldy);
      Dev<int32_t> di(ids);
      Dev<float> y32(m * ldy);
      y16.Poison();
      y32.Poison();
      cuda::EmbeddingParams p;
      p.table = dt.get();
      p.vocab = vocab;
      p.d = d;
      p.ids = di.get();
      p.m = m;
      p.ldy = ldy;
      p.y_f32 = y32.get();
      ASSERT_TRUE(cuda::Embedding(p, nullptr).ok());
      p.y_f32 = nullptr;
      p.y_f16 = y16.get();
      ASSERT_TRUE(cuda::Embedding(p, nullptr).ok());
      const auto o32 = y32.Down(m * ldy);
      const auto o16 = y16.Down(m * ldy);
      for (int64_t i = 0; i < m; ++i) {
        const bool ok = ids[i] >= 0 && ids[i] < vocab;
        for (int64_t j = 0; j < d; ++j) {
          const uint16_t e = ok ? table[ids[i] * d + j] : FloatToHalf(0.f);
          ASSERT_EQ(o16[i * ldy + j], e) << "i=" << i << " j=" << j;
          ASSERT_EQ(o32[i * ldy + j], HalfToFloat(e)) << "i=" << i << " j=" << j;
        }
        for (int64_t j = d; j < ldy; ++j) {
          ASSERT_EQ(o16[i * ldy + j], 0xffff);
          ASSERT_TRUE(std::isnan(o32[i * ldy + j]));
        }
      }
    }
  }
}

TEST(CudaDecodeOps, ArgmaxMatchesReference) {
  SKIP_WITHOUT_GPU();
  auto rng = Rng();
  std::normal_distribution<float> nd;
  // (n, ld): ld % 4 == 0 takes the float4 path (with a scalar tail when
  // n % 4 != 0), else the scalar one.
  const std::pair<int64_t, int64_t> shapes[] = {
      {1, 4}, {999, 1002}, {1001, 1004}, {128256, 128260}};
  for (auto [n, ld] : shapes) {
    for (int64_t m : {1, 3, 17, 65}) {
      std::vector<float> x(m * ld);
      for (float& v : x) v = nd(rng);
      for (int64_t i = 0; i < m; ++i) {
        if (n > 10 && i % 3 == 1) {  // a tie: the lower index wins
          const int64_t a = rng() % n, b = rng() % n;
          x[i * ld + a] = x[i * ld + b] = 100.f;
        }
        if (n > 10 && i % 3 == 2) x[i * ld + rng() % n] = std::numeric_limits<float>::quiet_NaN();
        for (int64_t j = n; j < ld; ++j) x[i * ld + j] = 1e30f;  // outside the row
      }
      Dev<float> dx(x);
      Dev<int32_t> dout(m);
      dout.Poison();
      ASSERT_TRUE(cuda::Argmax(dx.get(), m, n, ld, dout.get(), nullptr).ok());
      const auto out = dout.Down(m);
      for (int64_t i = 0; i < m; ++i) {
        int64_t best = -1;
        for (int64_t j = 0; j < n; ++j) {
          const float v = x[i * ld + j];
          if (std::isnan(v)) continue;
          if (best < 0 || v > x[i * ld + best]) best = j;
        }
        ASSERT_EQ(out[i], best < 0 ? 0 : best) << "n=" << n << " m=" << m << " i=" << i;
      }
    }
  }
}

}  // namespace
}  // namespace spear::kernels
