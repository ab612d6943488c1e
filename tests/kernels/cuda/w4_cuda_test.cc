// cuda::W4Linear (decode kernel, prefill path, EC pieces) against the
// scalar reference ref::W4Linear on fresh random inputs (seed printed).
// Labelled `gpu`; every test skips with a message when no device exists.
//
// Tolerance: the GPU rounds each dequantized weight s * (q - z) and the EC's
// A, B and g ⊙ u to fp16 (relative error <= 2^-11 each, random sign) and
// accumulates in fp32; the reference sees the same fp16 x, A and B and
// accumulates in double. Expected error ~ 2^-12 of the output's RMS; we
// allow |y - ref| <= 2e-3 * rms(ref) + 2e-3 * |ref| (+ 1e-3 * |ref| for fp16
// outputs), and the relative L2 error over the output must stay <= 1e-3.
// With act_scale the device also rounds x / act_scale to fp16 (a second
// 2^-12 input rounding the reference does not make; one element in 266K
// reached 2.2e-3 * rms on the H200): 4e-3 * rms there.
// Outputs are NaN-poisoned before every launch (unless accumulating), so an
// unwritten element fails.
#include <cuda_runtime.h>
#include <algorithm>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <random>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/gpu_skip.h"
#include "kernels/cuda/w4_layout.h"
#include "kernels/cuda_ops.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "kernels/ec_tile_layout.h"
#include "kernels/w4_cuda.h"
#include "kernels/w4_ops.h"

namespace spear::kernels {
namespace {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n) : n_(n) { EXPECT_EQ(cudaMalloc(&p_, n * sizeof(T) + 16), cudaSuccess); }
  ~DevBuf() { cudaFree(p_); }
  T* get() { return p_; }
  void Up(const std::vector<T>& h) {
    EXPECT_EQ(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Down() {
    std::vector<T> h(n_);
    EXPECT_EQ(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  void Poison() { EXPECT_EQ(cudaMemset(p_, 0xff, n_ * sizeof(T)), cudaSuccess); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

float RoundHalf(float v) { return HalfToFloat(FloatToHalf(v)); }

unsigned Seed() {
  static const unsigned s = [] {
    // SPEAR_TEST_SEED pins the inputs (a failure's printed seed reruns it);
    // unset: a fresh seed per process.
    const char* e = std::getenv("SPEAR_TEST_SEED");
    const unsigned v = e != nullptr && *e != '\0' ? static_cast<unsigned>(std::strtoul(e, nullptr, 10))
                                                  : std::random_device{}();
    std::printf("w4_cuda_test seed %u\n", v);
    return v;
  }();
  return s;
}

W4Weight RandomW4(int64_t n, int64_t k, int64_t g, bool symmetric, bool act_scale,
                  std::mt19937& rng) {
  W4Weight w;
  w.fmt = {n, k, g, symmetric};
  const int64_t ng = (k + g - 1) / g;
  w.packed.assign(static_cast<size_t>(n * w.fmt.packed_row_bytes()), 0);
  std::uniform_int_distribution<int> code(0, 15);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const uint8_t c = static_cast<uint8_t>(code(rng));
      w.packed[static_cast<size_t>(i * w.fmt.packed_row_bytes() + j / 2)] |= (j & 1) ? c << 4 : c;
    }
  }
  std::uniform_real_distribution<float> sc(0.004f, 0.02f);
  w.scales.resize(static_cast<size_t>(n * ng));
  w.zeros.resize(static_cast<size_t>(n * ng));
  for (size_t i = 0; i < w.scales.size(); ++i) {
    w.scales[i] = FloatToHalf(sc(rng));
    w.zeros[i] = symmetric ? 8 : static_cast<uint8_t>(code(rng));
  }
  if (act_scale) {
    std::uniform_real_distribution<float> as(0.5f, 2.f);
    w.act_scale.resize(static_cast<size_t>(k));
    for (float& v : w.act_scale) v = as(rng);
  }
  return w;
}

// A and B are rounded to fp16 (their served dtype) so that the reference
// and the device use the same values.
EcWeights RandomEc(int64_t n, int64_t k, int64_t r, int64_t h, bool gated, std::mt19937& rng) {
  EcWeights e;
  e.n = n;
  e.k = k;
  e.rank = r;
  e.gated = gated;
  e.gate_hidden = gated ? h : 0;
  std::normal_distribution<float> nd;
  e.a.resize(static_cast<size_t>(r * k));
  for (float& v : e.a) v = RoundHalf(nd(rng) / std::sqrt(static_cast<float>(k)));
  e.b.resize(static_cast<size_t>(n * r));
  for (float& v : e.b) v = RoundHalf(0.05f * nd(rng));
  if (gated) {
    for (auto* v : {&e.w1, &e.b1, &e.w2, &e.b2}) v->clear();
    e.w1.resize(static_cast<size_t>(h * r));
    e.b1.resize(static_cast<size_t>(h));
    e.w2.resize(static_cast<size_t>(r * h));
    e.b2.resize(static_cast<size_t>(r));
    for (auto* v : {&e.w1, &e.b1, &e.w2, &e.b2}) {
      for (float& x : *v) x = 0.5f * nd(rng);
    }
  }
  return e;
}

// The int8 forms of an EC (Case::ec_form): 1 on the int8 grid (float form,
// EcFactors::kI8), 2 compact (the codes as a .spear holds them), 3 a merged
// EC's block-diagonal B (three modules on 64-column groups, each rounded to
// the grid on its own, as the CUDA runner merges q / k / v), 4 the same with
// the module boundaries off the 64-column groups (served as fp16 records).
// Puts `len` values (`stride` apart) on an int8 grid of power-of-two
// scales: each group of 64 holds codes in [-127, 127] times 2^e (e from the
// line's largest value), its first value 127 x 2^e, so that the encoder
// picks exactly 2^e. Then code x scale is exact in fp16 too, and the
// device's fp16(code x scale) equals the reference's value, as RandomEc's
// fp16-rounded factors do. off_grid: the 127 last in each group and the
// other codes within [-100, 100], so that groups cut elsewhere (a merged
// EC's module boundary inside a 64-column group) get other scales.
void SnapPow2(float* x, int64_t len, int64_t stride, bool off_grid = false) {
  float mx = 0.f;
  for (int64_t i = 0; i < len; ++i) mx = std::max(mx, std::fabs(x[i * stride]));
  if (mx == 0.f) return;
  const float cmax = off_grid ? 100.f : 127.f;
  const int e = std::max(-14, static_cast<int>(std::ceil(std::log2(mx / cmax))));
  const float s = std::ldexp(1.f, e);
  for (int64_t i = 0; i < len; ++i) {
    const float c = std::clamp(std::nearbyint(x[i * stride] / s), -cmax, cmax);
    const bool top = off_grid ? (i % kEcI8Group == kEcI8Group - 1 || i == len - 1)
                              : i % kEcI8Group == 0;
    x[i * stride] = (top ? 127.f : c) * s;
  }
}

void MakeEcForm(int form, EcWeights* e) {
  const int64_t n = e->n, k = e->k, r = e->rank;
  for (int64_t q = 0; q < r; ++q) SnapPow2(e->a.data() + q * k, k, 1);
  if (form == 3 || form == 4) {
    const int64_t unit = std::max<int64_t>(1, n / 192) * 64 + (form == 4 ? 8 : 0);
    const int64_t cb[4] = {0, std::min(n, unit), std::min(n, 2 * unit), n};
    const int64_t rb[4] = {0, r / 3, 2 * r / 3, r};
    for (int i = 0; i < 3; ++i) {
      const int64_t ni = cb[i + 1] - cb[i], ri = rb[i + 1] - rb[i];
      for (int64_t c = cb[i]; c < cb[i + 1]; ++c) {
        for (int64_t q = 0; q < r; ++q) {
          if (q < rb[i] || q >= rb[i + 1]) e->b[static_cast<size_t>(c * r + q)] = 0.f;
        }
      }
      if (ni == 0 || ri == 0) continue;
      for (int64_t q = rb[i]; q < rb[i + 1]; ++q) {
        SnapPow2(e->b.data() + cb[i] * r + q, ni, r, form == 4);
      }
      std::vector<float> bi(static_cast<size_t>(ni * ri));
      for (int64_t c = 0; c < ni; ++c) {
        for (int64_t q = 0; q < ri; ++q) bi[c * ri + q] = e->b[(cb[i] + c) * r + rb[i] + q];
      }
      ASSERT_TRUE(RoundEcFactorsI8(ni, k, ri, e->a.data() + rb[i] * k, bi.data()).ok());
      for (int64_t c = 0; c < ni; ++c) {
        for (int64_t q = 0; q < ri; ++q) e->b[(cb[i] + c) * r + rb[i] + q] = bi[c * ri + q];
      }
    }
    e->factors = EcFactors::kI8;
    return;
  }
  for (int64_t q = 0; q < r; ++q) SnapPow2(e->b.data() + q, n, r);
  ASSERT_TRUE(RoundEcFactorsI8(e).ok());
  if (form == 2) {
    ASSERT_TRUE(CompactEcFactorsI8(e).ok());
  }
}

struct Case {
  int64_t n, k, g;
  int64_t m;
  int ec;  // 0 none, 1 static, 2 gated
  bool act_scale, bias, accumulate, f16_out, symmetric;
  bool force_prefill = false;
  bool force_decode = false;
  int decode_kernel = 0;  // W4CudaParams::decode_kernel
  int decode_splits = 0, decode_depth = 0;  // fold kernel (0 = automatic)
  int64_t ldx_pad = 0;
  int64_t ldy_pad = 3;  // y row stride = n + ldy_pad
  int64_t ec_rank = 32, ec_hidden = 16;
  int ec_prologue = 0;  // W4CudaParams::ec_prologue
  int64_t gate_pad = 0;  // gate_out row stride = rank + gate_pad (W4CudaParams::gate_ld)
  int prefill_kernel = 0;  // W4CudaParams::prefill_kernel
  int prefill_splits = 0;  // W4CudaParams::prefill_splits (wgmma kernel; 0 automatic)
  int ec_form = 0;         // MakeEcForm (0: fp16 values)
  cuda::W4DeviceWeight::DecodeTuning tuning;  // set on the device weight for every m <= 8
  cuda::W4DeviceWeight::PrefillTuning ptuning;  // set on the device weight for every bucket
  std::string Name() const {
    return absl::StrCat("n=", n, " k=", k, " g=", g, " m=", m, " ec=", ec, " as=", act_scale,
                        " bias=", bias, " acc=", accumulate, " f16=", f16_out,
                        " sym=", symmetric, " prefill=", force_prefill,
                        " decode=", force_decode, " dk=", decode_kernel, " splits=", decode_splits,
                        " depth=", decode_depth, " ldxpad=", ldx_pad, " ldypad=", ldy_pad, " r=", ec_rank,
                        " h=", ec_hidden, " prologue=", ec_prologue, " gpad=", gate_pad,
                        " pk=", prefill_kernel, " psplits=", prefill_splits, " ecform=", ec_form, " tuned=", tuning.warps, "/", tuning.splits,
                        "/", tuning.depth, " G", tuning.groups, " ptuned=", ptuning.kernel, "/", ptuning.splits);
  }
};

// Runs one case on the device and the reference; returns the relative L2
// error (and fails the test on any element out of tolerance).
void RunCase(const Case& c, std::mt19937& rng, cuda::W4Workspace* ws) {
  SCOPED_TRACE(c.Name());
  const W4Weight w = RandomW4(c.n, c.k, c.g, c.symmetric, c.act_scale, rng);
  EcWeights ec = RandomEc(c.n, c.k, c.ec_rank, c.ec_hidden, c.ec == 2, rng);
  if (c.ec && c.ec_form != 0) {
    MakeEcForm(c.ec_form, &ec);
    if (::testing::Test::HasFatalFailure()) return;
  }
  const EcWeights* ecp = c.ec ? &ec : nullptr;
  auto dw = cuda::W4DeviceWeight::Create(w, ecp);
  ASSERT_TRUE(dw.ok()) << dw.status();
  if (c.ec) {
    // B as int8 records where its codes reproduce it (forms 1-3), else fp16.
    const cuda::EcTileArgs& eb = (*dw)->impl().ecb;
    // (form 4 of a single 64-column group or less has no inner boundary)
    const bool boundary = c.n > std::max<int64_t>(1, c.n / 192) * 64 + 8;
    EXPECT_EQ(eb.scales != nullptr, c.ec_form >= 1 && (c.ec_form <= 3 || !boundary));
    // A's codes wherever the EC is int8 and k % 8 == 0
    EXPECT_EQ((*dw)->impl().ec_a8 != nullptr, c.ec_form >= 1 && c.k % 8 == 0);
    if (c.ec_form == 3 && c.n >= 192 && c.ec_rank >= 6) {
      EXPECT_EQ(eb.nseg, 3);
    }
  }
  for (int64_t tm = 1; tm <= cuda::W4DeviceWeight::kMaxTunedM; ++tm) {
    (*dw)->set_decode_tuning(tm, c.tuning);
  }
  for (int b = 0; b < cuda::W4DeviceWeight::kPrefillBuckets; ++b) {
    (*dw)->set_prefill_tuning(b, c.ptuning);
  }

  const int64_t m = c.m, n = c.n, k = c.k, ldx = k + c.ldx_pad, ldy = n + c.ldy_pad;
  std::normal_distribution<float> nd;
  std::vector<uint16_t> xh(static_cast<size_t>(m * ldx), FloatToHalf(0.f));
  std::vector<float> xf(static_cast<size_t>(m * ldx), 0.f);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      xh[i * ldx + j] = FloatToHalf(nd(rng));
      xf[i * ldx + j] = HalfToFloat(xh[i * ldx + j]);
    }
  }
  std::vector<float> bias(static_cast<size_t>(n));
  for (float& v : bias) v = nd(rng);
  std::vector<float> y0(static_cast<size_t>(m * ldy));
  for (float& v : y0) v = c.f16_out ? RoundHalf(nd(rng)) : nd(rng);

  // Reference.
  std::vector<float> yref = y0, gref(static_cast<size_t>(m * c.ec_rank), 0.f);
  W4LinearParams rp;
  rp.x = xf.data();
  rp.m = m;
  rp.k = k;
  rp.ldx = ldx;
  rp.w = &w;
  rp.ec = ecp;
  rp.bias = c.bias ? bias.data() : nullptr;
  rp.y = yref.data();
  rp.ldy = ldy;
  rp.accumulate = c.accumulate;
  rp.gate_out = c.ec ? gref.data() : nullptr;
  ASSERT_TRUE(ref::W4Linear(rp).ok());

  // Device.
  DevBuf<uint16_t> dx(xh.size());
  dx.Up(xh);
  DevBuf<float> dbias(bias.size());
  dbias.Up(bias);
  DevBuf<float> dy32(y0.size());
  DevBuf<uint16_t> dy16(y0.size());
  const int64_t gld = c.ec_rank + c.gate_pad;
  DevBuf<float> dgate(static_cast<size_t>(m * gld));
  dgate.Poison();
  if (c.accumulate) {
    dy32.Up(y0);
    std::vector<uint16_t> y0h(y0.size());
    for (size_t i = 0; i < y0.size(); ++i) y0h[i] = FloatToHalf(y0[i]);
    dy16.Up(y0h);
  } else {
    dy32.Poison();
    dy16.Poison();
  }
  cuda::W4CudaParams p;
  p.x = dx.get();
  p.m = m;
  p.ldx = ldx;
  p.bias = c.bias ? dbias.get() : nullptr;
  if (c.f16_out) {
    p.y_f16 = dy16.get();
  } else {
    p.y_f32 = dy32.get();
  }
  p.ldy = ldy;
  p.accumulate = c.accumulate;
  p.gate_out = c.ec ? dgate.get() : nullptr;
  p.gate_ld = c.gate_pad > 0 ? gld : 0;
  p.force_prefill = c.force_prefill;
  p.force_decode = c.force_decode;
  p.decode_kernel = c.decode_kernel;
  p.decode_splits = c.decode_splits;
  p.decode_depth = c.decode_depth;
  p.ec_prologue = c.ec_prologue;
  p.prefill_kernel = c.prefill_kernel;
  p.prefill_splits = c.prefill_splits;
  {
    const absl::Status st = cuda::W4Linear(**dw, p, ws, nullptr);
    ASSERT_TRUE(st.ok()) << st;
  }
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> y(y0.size());
  if (c.f16_out) {
    const std::vector<uint16_t> yh = dy16.Down();
    for (size_t i = 0; i < y.size(); ++i) y[i] = HalfToFloat(yh[i]);
  } else {
    y = dy32.Down();
  }

  double ss = 0, se = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) ss += double{yref[i * ldy + j]} * yref[i * ldy + j];
  }
  const double rms = std::sqrt(ss / static_cast<double>(m * n));
  const double rtol = c.f16_out ? 3e-3 : 2e-3;
  int bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double a = y[i * ldy + j], b = yref[i * ldy + j];
      se += (a - b) * (a - b);
      const double atol = (c.act_scale ? 4e-3 : 2e-3) * rms;
      if (!(std::fabs(a - b) <= atol + rtol * std::fabs(b))) {
        if (++bad <= 5) ADD_FAILURE() << "y[" << i << "," << j << "] = " << a << " want " << b;
      }
    }
    // Elements past n in each row (ldy padding) must be untouched.
    for (int64_t j = n; j < ldy && !c.accumulate; ++j) {
      ASSERT_TRUE(std::isnan(y[i * ldy + j])) << "wrote past n at row " << i;
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_LE(std::sqrt(se / ss), 1e-3);
  if (c.ec) {
    const std::vector<float> g = dgate.Down();
    for (size_t i = 0; i < gref.size(); ++i) {
      const size_t gi = (i / c.ec_rank) * gld + i % c.ec_rank;
      ASSERT_NEAR(g[gi], gref[i], 2e-3 * (1 + std::fabs(gref[i]))) << "gate " << i;
    }
  }
}

// One W4Linear call captured into a CUDA graph on a new stream, replayed
// `reps` times, then synchronized (the caller reads its outputs).
void CaptureAndReplay(const cuda::W4DeviceWeight& w, const cuda::W4CudaParams& p,
                      cuda::W4Workspace* ws, int reps) {
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  const absl::Status st = cuda::W4Linear(w, p, ws, s);
  CUDA_OK(cudaStreamEndCapture(s, &g));
  ASSERT_TRUE(st.ok()) << st;
  CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
  for (int i = 0; i < reps; ++i) CUDA_OK(cudaGraphLaunch(ge, s));
  CUDA_OK(cudaStreamSynchronize(s));
  CUDA_OK(cudaGraphExecDestroy(ge));
  CUDA_OK(cudaGraphDestroy(g));
  CUDA_OK(cudaStreamDestroy(s));
}

// v49 / v51: one W4Linear call form and one shape, for the tests of x's
// producer inside the call.
struct XCallForm {
  int64_t m;
  int ec;  // 0 none, 1 static, 2 gated
  int decode_kernel, decode_splits, ec_prologue;
};
// One row on 4- / 8-warp blocks, warp groups, k splits, EC none / static /
// gated, the v27 prologue (16), a forced non-fold kernel (3); two and five rows.
const XCallForm kXCallForms[] = {{1, 0, 0, 0, 0},  {1, 2, 0, 0, 0},       {1, 1, 5, 0, 0},
                                 {1, 2, 4, 2, 0},  {1, 0, 5 | 512, 0, 0}, {1, 2, 0, 0, 16},
                                 {1, 0, 3, 0, 0},  {2, 2, 0, 0, 0},       {5, 0, 0, 0, 0}};

// Runs W4Linear with x = xa (written by x's producer as its own launch) and
// again with `in_call` setting the fields by which the call computes x itself
// (x null, x_out = xb), and checks: y bit for bit the same; xb untouched
// (poisoned) exactly where `in_kernels`, else holding xa's rows; with
// `replay`, the second call captured in a graph and replayed gives y again.
void CheckXInCall(const cuda::W4DeviceWeight& w, cuda::W4Workspace* ws, const XCallForm& f,
                  int64_t n, int64_t k, int64_t ldx, DevBuf<uint16_t>& xa, DevBuf<uint16_t>& xb,
                  const std::function<void(cuda::W4CudaParams*)>& in_call, bool in_kernels,
                  bool replay) {
  const int64_t m = f.m;
  DevBuf<float> ya(static_cast<size_t>(m * n)), yb(static_cast<size_t>(m * n));
  ya.Poison();
  yb.Poison();
  cuda::W4CudaParams p;
  p.x = xa.get();
  p.m = m;
  p.ldx = ldx;
  p.y_f32 = ya.get();
  p.ldy = n;
  p.force_decode = true;
  p.decode_kernel = f.decode_kernel;
  p.decode_splits = f.decode_splits;
  p.ec_prologue = f.ec_prologue;
  {
    const absl::Status st = cuda::W4Linear(w, p, ws, nullptr);
    ASSERT_TRUE(st.ok()) << st;
  }
  cuda::W4CudaParams q = p;
  q.x = nullptr;
  q.y_f32 = yb.get();
  in_call(&q);
  {
    const absl::Status st = cuda::W4Linear(w, q, ws, nullptr);
    ASSERT_TRUE(st.ok()) << st;
  }
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<float> a = ya.Down(), b = yb.Down();
  ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "y differs";
  const std::vector<uint16_t> xo = xb.Down();
  if (in_kernels) {
    EXPECT_EQ(xo, std::vector<uint16_t>(xo.size(), 0xffff)) << "x_out written";
  } else {
    const std::vector<uint16_t> xr = xa.Down();
    for (int64_t i = 0; i < m; ++i) {
      ASSERT_EQ(std::memcmp(xo.data() + i * ldx, xr.data() + i * ldx, k * 2), 0) << "x row " << i;
    }
  }
  if (replay) {
    yb.Poison();
    CaptureAndReplay(w, q, ws, 3);
    if (::testing::Test::HasFatalFailure()) return;
    const std::vector<float> c = yb.Down();
    EXPECT_EQ(std::memcmp(a.data(), c.data(), a.size() * 4), 0) << "graph replay";
  }
}

TEST(CudaW4, DecodeMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed());
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g;
  };
  const Shape shapes[] = {{64, 128, 128},  {200, 384, 32},   {576, 576, 64},
                          {1000, 1000, 1000}, {77, 33, 33}, {130, 4096, 128},
                          {4096, 256, 256}, {96, 1088, 64}, {520, 2048, 2048},
                          // ragged last group (num_groups = ceil(k / g)):
                          {192, 576, 128}, {70, 100, 32}, {130, 1000, 256}};
  // m <= 8 per launch: the fold kernel (1, 2, 3, 5, 8; 65 = 64 + 1; since
  // v43 also 17 and 33 = 32 + 1, four token tiles, where no other kernel is
  // forced); 9..16
  // (12, 16): the v8 ring kernel on these narrow shapes (FoldPreferred), the
  // fold kernel's two token tiles where 8 warps are forced; every 4th case the
  // x-as-m16 kernel, every other 4th the register-direct (v7) or the ring
  // (v8) variant of the swapped kernel, alternating; every 8th the fold
  // kernel with 8 warps forced (decode_kernel 5).
  const int64_t ms[] = {1, 2, 3, 5, 8, 12, 16, 17, 33, 64, 65};
  int v = 0;
  for (const Shape& s : shapes) {
    for (int64_t m : ms) {
      Case c{s.n, s.k, s.g, m};
      c.ec = v % 3;
      c.act_scale = v % 5 == 1;
      c.bias = v % 2 == 0;
      c.accumulate = v % 4 == 3;
      c.f16_out = v % 3 == 1;
      c.symmetric = v % 7 == 2;
      c.ldx_pad = (v % 6 == 5) ? 8 : 0;
      c.force_decode = true;  // the decode kernel at every m (65: two launches)
      c.decode_kernel = v % 4 == 1 ? 1 : v % 8 == 3 ? 2 : v % 8 == 7 ? 3 : v % 8 == 6 ? 5 : 0;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
}

// The decode EC prologue (u = A x over P k ranges of >= 2048, the gate in
// the last block) in its four forms (ec_prologue 0..3: the k split with
// v27's gate (dot products over lane groups), or v12's shape with one
// warp per token; under
// PDL before the fold kernel (m <= 8), or a plain launch) on k with 1
// (1000), 2 (2049: the scalar path, k % 8 != 0), 7 (14336, Llama-3-8B's
// down) and the capped 16 ranges (40000: each range 2504 long), ranks 4..256
// (100: rp padded to 112), gate hidden 16 or 64 (large r x h or m: the
// parallel gate does not fit shared memory and falls back to a warp per
// token), static and gated ECs, m = 1..64; with form 3 the fold kernel
// reads B from global memory (decode_kernel 128) instead of shared memory;
// form 2 writes the gate values with a row stride (gate_ld = r + 5).
TEST(CudaW4, EcPrologueFormsMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 11);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g, r, h;
  };
  // The last shape (a merged q / k / v-like EC of rank 104, 48 hidden
  // units) meets the default form at m = 5, where the gate's staged copy
  // does not fit 40 KB and W1 then W2 are staged in two phases (v58); the
  // rank-256 one runs the warp gate (neither fits).
  const Shape shapes[] = {{192, 1000, 1000, 4, 16},  {130, 2049, 2049, 32, 16},
                          {256, 14336, 128, 32, 16}, {72, 40000, 40000, 100, 64},
                          {128, 4096, 128, 256, 64}, {160, 4096, 128, 104, 48}};
  const int64_t ms[] = {1, 5, 16, 64};
  // ec_prologue: the default, v12's form, a plain launch, both; the warp
  // gate wherever the staged one does not fit (before v58).
  const int forms[] = {0, 1, 2, 3, 512};
  int v = 0;
  for (const Shape& s : shapes) {
    for (int form : forms) {
      Case c{s.n, s.k, s.g, ms[v % 4]};
      c.ec = v % 5 == 4 ? 1 : 2;
      c.ec_rank = s.r;
      c.ec_hidden = s.h;
      c.ec_prologue = form;
      c.gate_pad = form == 2 ? 5 : 0;  // gate_out rows strided (the CUDA runner's gate buffer)
      c.decode_kernel = form == 3 ? 128 : 0;  // fold: B fragments from global memory
      c.act_scale = v % 3 == 1;
      c.bias = v % 2 == 0;
      c.accumulate = v % 4 == 3;
      c.f16_out = v % 3 == 2;
      c.symmetric = false;
      c.force_decode = true;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
}

// v60: the one-cluster prologue (one row, before the fold kernel) computes u
// by tensor cores (ec_prologue 0) or by the lanes' dot products (1024, before
// v60), on shapes where its slices fit 160 KB: ranks off the tensor-core
// form's tiles of 16 (1, 7, 13, 100, 150: the rows past r read row r - 1),
// k off its 32-value steps and off the 64-value groups of int8 A (1000,
// 4104: zeros past a block's pieces), a long k (14336: 224 pieces a block),
// fp16 A and int8 A (MakeEcForm 1 / 2 / 3), static and gated ECs.
TEST(CudaW4, ClusterPrologueMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 60);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g, r, h;
    int ec_form;
  };
  const Shape shapes[] = {{192, 1000, 1000, 1, 16, 0},  {200, 4104, 4104, 7, 16, 1},
                          {320, 4096, 128, 13, 16, 2},  {512, 4096, 128, 100, 48, 0},
                          {640, 4096, 128, 150, 48, 3}, {256, 14336, 128, 40, 16, 1}};
  int v = 0;
  for (const Shape& s : shapes) {
    for (int form : {0, 1024}) {
      Case c{s.n, s.k, s.g, 1};
      c.ec = v % 3 == 2 ? 1 : 2;
      c.ec_rank = s.r;
      c.ec_hidden = s.h;
      c.ec_form = s.ec_form;
      c.ec_prologue = form;
      c.bias = v % 2 == 0;
      c.f16_out = v % 4 == 1;
      c.accumulate = v % 5 == 3;
      c.force_decode = true;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
}

// The fold kernel (m <= 16: one or two token tiles) at every forced warp count, k split and ring depth, on a
// Llama-like g128 shape and a per-channel one with k off 128; the L2 prefetch
// (v12) in its three modes in rotation.
TEST(CudaW4, FoldSplitsAndDepthsMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 5);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  int v = 0;
  for (int dk : {4, 5}) {  // 4 warps, 8 warps
    for (int splits : {1, 2, 4, 8}) {
      for (int depth : {2, 3, 4}) {
        // v43: every 6th case at 17..32 rows (four token tiles), always on
        // the k = 1000 shape (its x fits every forced configuration)
        const int64_t m = v % 6 == 1 ? 17 + (5 * v) % 16 : 1 + (5 * v) % 16;
        Case c{v % 2 ? 320 : 256, v % 2 ? 1000 : 4096, v % 2 ? 1000 : 128, m};
        c.ec = v % 3;
        c.bias = v % 2 == 0;
        c.f16_out = v % 3 == 1;
        c.force_decode = true;
        // the L2 prefetch before the dependency wait: off (default), first
        // wave (16), every block (32)
        c.decode_kernel = dk | (v % 3 == 1 ? 16 : v % 3 == 2 ? 32 : 0);
        c.decode_splits = splits;
        c.decode_depth = depth;
        ++v;
        RunCase(c, rng, ws->get());
        if (HasFatalFailure()) return;
      }
    }
  }
}

// The fold kernel's persistent loop (v12): a GEMM with more 64-column tiles
// than one wave of blocks holds (n > 64 x 2 x SMs / S for 8-warp blocks)
// runs one wave of blocks that loop over tiles with the ring running on
// across tiles (n = 3 x 64 x SMs + 77), against the reference. The loop is
// taken only where its layout (reduction buffers after the ring) keeps as
// many blocks per SM: on the H200 8 warps at k = 512 (S = 1 and 2) and 4
// warps at S = 2 depth 3; the other cases run one tile per block (two waves
// for 8 warps at k = 1000), the reduction over the drained ring.
TEST(CudaW4, FoldPersistentLoopMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 6);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  const int64_t n = 64 * 3 * int64_t{cuda::NumSms()} + 77;
  int v = 0;
  for (int dk : {5, 4}) {
    for (int splits : {1, 2}) {
      for (int depth : {2, 3}) {
        Case c{n, v % 2 ? 1000 : 512, v % 2 ? 1000 : 128, 1 + (3 * v) % 16};
        c.ec = v % 3;
        c.bias = v % 2 == 0;
        c.f16_out = v % 3 == 1;
        c.accumulate = v % 4 == 3;
        c.force_decode = true;
        // 128 (v = 5, a gated EC): the B fragments from global memory, not
        // prefetched with each tile's first chunk (double-buffered by tile).
        c.decode_kernel = dk | (v % 4 == 2 ? 16 : 0) | (v % 6 == 5 ? 128 : 0);
        c.decode_splits = splits;
        c.decode_depth = depth;
        ++v;
        RunCase(c, rng, ws->get());
        if (HasFatalFailure()) return;
      }
    }
  }
}

// v40: the fold kernel's warps in groups, each group on its own tile
// (decode_kernel flags 256 / 512 / 768 = 2 / 4 / 8 groups): one block per
// G tiles (n = 320: five tiles, the last block's groups partly idle) and
// the persistent loop (n = 3 x 64 x SMs + 77), with and without k splits
// (a cluster's reduction per G tiles; none with one warp per group and
// S = 1: the warp stores its own sums), every m from 1 to 16 over the cases,
// ECs, bias, accumulation, fp16 output, against the reference; then the
// automatic choice at 9..16 rows on the shapes where it is grouped (8B qkv at
// >= 12 rows, gate_up). The test checks the outputs, not which kernel ran:
// that the automatic choice is grouped there is seen in the bench (its
// auto column equals the 8-group rows; docs/results/gpu.md, "v40").
TEST(CudaW4, FoldWarpGroupsMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 15);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  const int64_t wide = 64 * 3 * int64_t{cuda::NumSms()} + 77;
  int v = 0;
  for (int dk : {5, 4}) {
    for (int groups : {2, 4, 8}) {
      if (groups > (dk == 5 ? 8 : 4)) continue;
      for (int splits : {1, 2}) {
        for (int64_t n : {int64_t{320}, wide}) {
          Case c{n, v % 2 ? 1000 : 4096, v % 2 ? 1000 : 128, 1 + (7 * v) % 16};
          c.ec = v % 3;
          c.bias = v % 2 == 0;
          c.f16_out = v % 3 == 1;
          c.accumulate = v % 4 == 3;
          c.force_decode = true;
          c.decode_kernel = dk | (groups == 2 ? 256 : groups == 4 ? 512 : 768) | (v % 5 == 4 ? 64 : 0);
          c.decode_splits = splits;
          ++v;
          RunCase(c, rng, ws->get());
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  // The automatic choice at 9..16 rows on wide k = 4096 GEMMs (8B qkv and
  // gate_up shapes).
  for (const auto& [n, m] : {std::pair<int64_t, int64_t>{6144, 16}, {6144, 11}, {28672, 13}}) {
    Case c{n, 4096, 128, m};
    c.ec = m == 11 ? 2 : 0;
    c.bias = m == 16;
    c.f16_out = m != 13;
    c.force_decode = true;
    RunCase(c, rng, ws->get());
    if (HasFatalFailure()) return;
  }
}

// v43: the fold kernel's four n8 token tiles (17..32 rows), the automatic
// choice on the 8B and 1B shapes (qkv, o, gate_up, down; grouped or not,
// persistent or not, as the cost model picks), every row count class
// (17: one real row in the last tile; 24; 31; 32), ECs (static and gated,
// prologue under PDL), bias, accumulation, fp16 output and k off 128;
// then forced 4 / 8 warps, warp groups and k splits on a mid shape.
TEST(CudaW4, FoldFourTokenTilesMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 16);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g, m;
  };
  const Shape shapes[] = {{6144, 4096, 128, 32},  {4096, 4096, 128, 17}, {28672, 4096, 128, 24},
                          {4096, 14336, 128, 31}, {3072, 2048, 128, 32}, {2048, 2048, 128, 20},
                          {16384, 2048, 128, 29}, {2048, 8192, 128, 32}, {330, 1000, 1000, 27}};
  int v = 0;
  for (const Shape& s : shapes) {
    Case c{s.n, s.k, s.g, s.m};
    c.ec = v % 3;
    c.bias = v % 2 == 0;
    c.f16_out = v % 3 == 1;
    c.accumulate = v % 4 == 3;
    c.force_decode = true;
    ++v;
    RunCase(c, rng, ws->get());
    if (HasFatalFailure()) return;
  }
  for (int dk : {4, 5, 5 | 768, 4 | 512, 5 | 64}) {
    for (int splits : {0, 2, 4}) {
      Case c{v % 2 ? 576 : 4160, v % 2 ? 1000 : 2048, v % 2 ? 1000 : 128, 17 + (7 * v) % 16};
      c.ec = v % 3;
      c.bias = v % 2 == 0;
      c.f16_out = v % 3 == 2;
      c.accumulate = v % 5 == 4;
      c.force_decode = true;
      c.decode_kernel = dk;
      c.decode_splits = splits;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
}

// v23: TuneDecode measures the fold kernel's configurations on a set of
// same-shape weights and records a pick per m (or none, when the cost
// model's own choice is within 5 %); a recorded pick is a valid
// configuration (warps 4 / 8, splits 1..8, depth 2..4), the outputs through
// it match the reference (RunCase with a tuned weight: the tuning is looked
// up by m at launch), and the refusals.
TEST(CudaW4, TuneDecodeRecordsValidConfigurations) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 14);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  const int64_t n = 64 * 3 * int64_t{cuda::NumSms()} + 77, k = 4096;
  std::vector<std::unique_ptr<cuda::W4DeviceWeight>> owned;
  std::vector<cuda::W4DeviceWeight*> ws_ptrs;
  for (int i = 0; i < 3; ++i) {
    auto dw = cuda::W4DeviceWeight::Create(RandomW4(n, k, 128, false, false, rng), nullptr);
    ASSERT_TRUE(dw.ok()) << dw.status();
    ws_ptrs.push_back(dw->get());
    owned.push_back(std::move(*dw));
  }
  ASSERT_TRUE(cuda::TuneDecode(ws_ptrs, 8, ws->get(), nullptr).ok());
  int picked = 0;
  for (int64_t m = 1; m <= 8; ++m) {
    const auto t = owned[0]->decode_tuning(m);
    for (const auto& o : owned) {
      const auto u = o->decode_tuning(m);
      EXPECT_EQ(u.warps, t.warps);
      EXPECT_EQ(u.splits, t.splits);
      EXPECT_EQ(u.depth, t.depth);
      EXPECT_EQ(u.groups, t.groups);
    }
    if (t.warps == 0) continue;
    ++picked;
    EXPECT_TRUE(t.warps == 4 || t.warps == 8) << m;
    EXPECT_TRUE(t.splits == 1 || t.splits == 2 || t.splits == 4 || t.splits == 8) << m;
    EXPECT_TRUE(t.depth >= 2 && t.depth <= 4) << m;
    // v41: one group (0), or 2 / 4 / 8 groups of the 8-warp kernel
    EXPECT_TRUE(t.groups == 0 || (t.warps == 8 && (t.groups == 2 || t.groups == 4 || t.groups == 8)))
        << m << ": groups " << t.groups;
    // v56: at one row no warp groups (slower inside the decode step)
    if (m == 1) {
      EXPECT_EQ(t.groups, 0) << "a grouped pick at one row";
    }
  }
  {  // Clone copies the tuning (set by hand: the measurement may pick none)
    auto src = cuda::W4DeviceWeight::Create(RandomW4(64, 256, 128, false, false, rng), nullptr);
    ASSERT_TRUE(src.ok());
    (*src)->set_decode_tuning(3, {4, 2, 3});
    (*src)->set_decode_tuning(5, {8, 4, 2, 8});
    auto clone = (*src)->Clone();
    ASSERT_TRUE(clone.ok());
    const auto t = (*clone)->decode_tuning(3);
    EXPECT_EQ(t.warps, 4);
    EXPECT_EQ(t.splits, 2);
    EXPECT_EQ(t.depth, 3);
    EXPECT_EQ(t.groups, 0);
    EXPECT_EQ((*clone)->decode_tuning(5).groups, 8);
    EXPECT_EQ((*clone)->decode_tuning(4).warps, 0);
  }
  std::printf("TuneDecode: n = %lld, k = 4096, g128: a configuration recorded for %d of m = 1..8\n",
              static_cast<long long>(n), picked);
  for (int64_t m = 1; m <= 8; ++m) {
    const auto t = owned[0]->decode_tuning(m);
    std::printf("  m = %lld: %d/%d/%d G%d\n", static_cast<long long>(m), t.warps, t.splits, t.depth,
                t.groups);
  }
  // Outputs through a tuned configuration: a weight whose tuning is set by
  // hand for every m (the same lookup W4Linear does for a measured one),
  // against the reference, m = 1..8, with and without a gated EC.
  // v41: also 8 warps in 2 / 4 / 8 groups (n = 300: 5 tiles, so some
  // groups of a block have no tile).
  int v = 0;
  for (const auto& [warps, groups] : {std::pair{4, 0}, {8, 0}, {8, 2}, {8, 4}, {8, 8}}) {
    for (int64_t m : {1, 3, 8}) {
      Case c{300, 2048, v % 2 ? 64 : 128, m};
      c.ec = v % 3;
      c.bias = v % 2 == 0;
      c.f16_out = v % 3 == 1;
      c.tuning = {warps, 1 << (v % 3), 2 + v % 3, groups};
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  // Refusals.
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TuneDecode({}, 8, ws->get(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TuneDecode(ws_ptrs, 0, ws->get(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TuneDecode(ws_ptrs, 9, ws->get(), nullptr)));
  auto other = cuda::W4DeviceWeight::Create(RandomW4(64, k, 128, false, false, rng), nullptr);
  ASSERT_TRUE(other.ok());
  std::vector<cuda::W4DeviceWeight*> mixed = {ws_ptrs[0], other->get()};
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TuneDecode(mixed, 8, ws->get(), nullptr)));
}

// v34: TunePrefill times the prefill path's main GEMM as dequantize +
// cuBLAS and as the wgmma kernels per bucket of m and records the same pick
// in every weight of the set (or none); a pick is a valid kernel; outputs
// through a tuned weight (W4Linear looks the pick up by m, its splits a
// preference) match the reference, also where the m of the call leaves no
// room for the splits; the refusals.
TEST(CudaW4, TunePrefillRecordsValidKernels) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 15);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  const int64_t n = 1000, k = 4096;
  std::vector<std::unique_ptr<cuda::W4DeviceWeight>> owned;
  std::vector<cuda::W4DeviceWeight*> ptrs;
  for (int i = 0; i < 2; ++i) {
    auto dw = cuda::W4DeviceWeight::Create(RandomW4(n, k, 128, false, false, rng), nullptr);
    ASSERT_TRUE(dw.ok()) << dw.status();
    ptrs.push_back(dw->get());
    owned.push_back(std::move(*dw));
  }
  std::vector<cuda::PrefillTuneRow> rows;
  ASSERT_TRUE(cuda::TunePrefill(ptrs, 512, ws->get(), nullptr, &rows).ok());
  // The report: the baseline and the candidates per bucket up to max_m,
  // and the recorded pick is the fastest candidate beating the baseline by
  // 5 %.
  constexpr int kC = 1 + cuda::kNumPrefillCandidates;
  ASSERT_EQ(rows.size(), size_t{4} * kC);
  for (int b = 0; b < 4; ++b) {
    const cuda::PrefillTuneRow* r = &rows[static_cast<size_t>(b) * kC];
    ASSERT_EQ(r[0].m, int64_t{64} << b);
    ASSERT_EQ(r[0].kernel, 1);
    ASSERT_TRUE(std::isfinite(r[0].us) && r[0].us > 0) << r[0].us;
    double best = r[0].us * 0.95;
    int kernel = 0, splits = 0;
    for (int c = 1; c < kC; ++c) {
      EXPECT_EQ(r[c].m, r[0].m);
      EXPECT_EQ(r[c].kernel, cuda::kPrefillCandidates[c - 1][0]);
      EXPECT_EQ(r[c].splits, cuda::kPrefillCandidates[c - 1][1]);
      EXPECT_GT(r[c].us, 0);
      if (r[c].us < best) best = r[c].us, kernel = r[c].kernel, splits = r[c].splits;
    }
    const auto t = owned[0]->prefill_tuning(r[0].m);
    EXPECT_EQ(t.kernel, kernel) << "m " << r[0].m;
    EXPECT_EQ(t.splits, kernel == 0 ? 0 : splits) << "m " << r[0].m;
  }
  std::string picks;
  for (int b = 0; b < cuda::W4DeviceWeight::kPrefillBuckets; ++b) {
    const auto t = owned[0]->prefill_tuning(int64_t{64} << b);
    EXPECT_EQ(owned[1]->prefill_tuning(int64_t{64} << b).kernel, t.kernel) << b;
    EXPECT_EQ(owned[1]->prefill_tuning(int64_t{64} << b).splits, t.splits) << b;
    if (b > 3) {
      EXPECT_EQ(t.kernel, 0) << "bucket " << b << " is above max_m";
    }
    if (t.kernel != 0) {
      EXPECT_TRUE((t.kernel & 15) == 2 || (t.kernel & 15) == 3) << t.kernel;
      EXPECT_TRUE(t.splits >= 1 && t.splits <= 4) << t.splits;
    }
    absl::StrAppend(&picks, " ", int64_t{64} << b, ":", t.kernel, "/", t.splits);
  }
  std::printf("TunePrefill: n = %lld, k = 4096, g128, picks by m (kernel/splits):%s\n",
              static_cast<long long>(n), picks.c_str());
  EXPECT_EQ(cuda::W4DeviceWeight::PrefillBucket(64), 0);
  EXPECT_EQ(cuda::W4DeviceWeight::PrefillBucket(127), 0);
  EXPECT_EQ(cuda::W4DeviceWeight::PrefillBucket(128), 1);
  EXPECT_EQ(cuda::W4DeviceWeight::PrefillBucket(1 << 20), cuda::W4DeviceWeight::kPrefillBuckets - 1);
  {  // Clone copies the tuning
    auto src = cuda::W4DeviceWeight::Create(RandomW4(64, 256, 128, false, false, rng), nullptr);
    ASSERT_TRUE(src.ok());
    (*src)->set_prefill_tuning(2, {3 | 128, 2});
    auto clone = (*src)->Clone();
    ASSERT_TRUE(clone.ok());
    EXPECT_EQ((*clone)->prefill_tuning(300).kernel, 3 | 128);
    EXPECT_EQ((*clone)->prefill_tuning(300).splits, 2);
    EXPECT_EQ((*clone)->prefill_tuning(200).kernel, 0);
  }
  // Outputs through a tuned weight (set by hand: the measurement may pick
  // none), every kernel form; m = 65 leaves room for no split on k = 256.
  int v = 0;
  for (const auto& [kernel, splits] : {std::pair<int, int>{2, 1}, std::pair<int, int>{3 | 128, 4},
                                       std::pair<int, int>{2 | 128, 2},
                                       std::pair<int, int>{3, 2}}) {
    for (const auto& [nn, kk, mm] : {std::tuple<int64_t, int64_t, int64_t>{300, 2048, 200},
                                     std::tuple<int64_t, int64_t, int64_t>{136, 256, 65}}) {
      Case c{nn, kk, 128, mm};
      c.ec = v % 3;
      c.bias = v % 2 == 0;
      c.f16_out = v % 3 == 1;
      c.ptuning = {kernel, splits};
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  // x not 16-byte aligned (ldx = k + 3): the tuned kernel cannot run, the
  // dequantizing path does.
  Case c{300, 2048, 128, 100};
  c.ldx_pad = 3;
  c.ptuning = {3 | 128, 1};
  RunCase(c, rng, ws->get());
  if (HasFatalFailure()) return;
  // Refusals.
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TunePrefill({}, 512, ws->get(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TunePrefill(ptrs, 63, ws->get(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TunePrefill(ptrs, 1 << 17, ws->get(), nullptr)));
  auto other = cuda::W4DeviceWeight::Create(RandomW4(64, k, 128, false, false, rng), nullptr);
  ASSERT_TRUE(other.ok());
  std::vector<cuda::W4DeviceWeight*> mixed = {ptrs[0], other->get()};
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::TunePrefill(mixed, 512, ws->get(), nullptr)));
}

TEST(CudaW4, PrefillMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 1);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  for (int v = 0; v < 6; ++v) {
    Case c{v % 2 ? 384 : 200, v % 3 ? 256 : 1000, v % 3 ? 64 : 1000, v < 3 ? 65 : 300};
    c.force_prefill = v < 3;  // m = 300 takes the prefill path by dispatch
    c.ec = v % 3;
    c.act_scale = v == 1 || v == 4;
    c.bias = v % 2 == 1;
    c.accumulate = v == 2;
    c.f16_out = v == 3;
    RunCase(c, rng, ws->get());
    if (HasFatalFailure()) return;
  }
}

// The prefill path's two main GEMMs (dequantize + cuBLAS; the wgmma kernel
// from the W4 layout with 128- or 256-token tiles) on shapes
// off every tile: n not a multiple of 64 or 128 or 256, k not a multiple of
// 64 or 128, m not a multiple of the 128-token tile, every group size, and
// k = 1001 / an odd ldx, which the automatic choice runs through the
// dequantizing path and the forced wgmma kernel refuses.
TEST(CudaW4, PrefillKernelsMatchReference) {
  SKIP_WITHOUT_GPU();
  int major = 0;
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  std::mt19937 rng(Seed() + 11);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct S {
    int64_t n, k, g, m;
  };
  // W4Linear's parameters on the forced prefill path (fp32 output).
  auto prefill_params = [](const uint16_t* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                           int kernel) {
    cuda::W4CudaParams p;
    p.x = x;
    p.m = m;
    p.ldx = ldx;
    p.y_f32 = y;
    p.ldy = ldy;
    p.force_prefill = true;
    p.prefill_kernel = kernel;
    return p;
  };
  // (the scalar reference dominates the run time: ~0.6 GFLOP per kernel here)
  const S shapes[] = {{200, 256, 64, 65},   {384, 1000, 1000, 300}, {330, 2048, 128, 257},
                      {130, 512, 32, 129},  {64, 136, 136, 1000},   {1100, 1024, 128, 130},
                      {72, 14336, 128, 136}};
  // + 128 (v34): the warp-specialized form of the 128- / 256-token kernel;
  // + 128 + 256 (v36): its stream-K form (m = 136, n = 72, k = 14336: one
  // tile in 4 pieces, the most per tile; m = 1000, n = 64, k = 136: 4 / 8
  // tiles of two stage pairs each, 2 pieces per tile).
  for (const int kernel : {1, 2, 3, 2 | 128, 3 | 128, 2 | 128 | 256, 3 | 128 | 256}) {
    if (kernel > 1 && major != 9) {
      std::printf("[ SKIPPED  ] the wgmma prefill kernel: device is sm_%d0, not sm_90\n", major);
      break;
    }
    int v = 0;
    for (const S& sh : shapes) {
      Case c{sh.n, sh.k, sh.g, sh.m};
      c.force_prefill = true;
      c.prefill_kernel = kernel;
      c.ec = v % 3;
      c.act_scale = v % 4 == 1;
      c.bias = v % 2 == 0;
      c.accumulate = v % 3 == 2;
      c.f16_out = v % 4 == 3;
      c.symmetric = v % 5 == 4;
      // v33: the wgmma kernel's k split automatic (no split) or forced to
      // one; forced splits of 2..4 follow.
      c.prefill_splits = kernel > 1 && v % 3 == 0 ? 1 : 0;
      // v35: rows of y a multiple of 4 (with n % 4 == 0 the epilogue's
      // vector stores) or not
      c.ldy_pad = v % 2 == 0 ? 0 : 3;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  if (major == 9) {
    // Forced k splits: 4 over k = 14336 (56 stages each), 3 over k = 1024;
    // both kernels (v34: + 128, the warp-specialized one).
    for (const auto& [sh, kernel, splits] :
         {std::tuple<S, int, int>{{72, 14336, 128, 136}, 3, 4},
          std::tuple<S, int, int>{{1100, 1024, 128, 130}, 2, 3},
          std::tuple<S, int, int>{{330, 2048, 128, 257}, 3, 2},
          std::tuple<S, int, int>{{72, 14336, 128, 300}, 3 | 128, 4},
          std::tuple<S, int, int>{{1100, 1024, 128, 130}, 2 | 128, 3},
          std::tuple<S, int, int>{{330, 2048, 64, 257}, 3 | 128, 2}}) {
      Case c{sh.n, sh.k, sh.g, sh.m};
      c.force_prefill = true;
      c.prefill_kernel = kernel;
      c.prefill_splits = splits;
      c.bias = true;
      c.accumulate = splits == 2;
      c.f16_out = splits == 3;
      c.ec = 2;
      c.ldy_pad = splits == 3 ? 3 : 0;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
    // v36: the stream-K kernel past one wave: 17 x 10 = 170 tiles of 256
    // tokens (one round of whole tiles, 38 stream-K tiles) and 17 x 20 =
    // 340 of 128 (two rounds, 76); k = 128: one stage pair per tile.
    for (const int kernel : {3 | 128 | 256, 2 | 128 | 256}) {
      Case c{2176, 128, 128, 2560};
      c.force_prefill = true;
      c.prefill_kernel = kernel;
      c.bias = true;
      c.accumulate = kernel == (2 | 128 | 256);
      c.f16_out = kernel == (3 | 128 | 256);
      c.ec = 1;
      c.ldy_pad = 0;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
    // Split or not, deterministic: bitwise the same output on every run, the
    // tickets left zero for the next call (a wrong count would skip the
    // epilogue or run it twice).
    const W4Weight w = RandomW4(1100, 4096, 128, false, false, rng);
    auto dw = cuda::W4DeviceWeight::Create(w, nullptr);
    ASSERT_TRUE(dw.ok()) << dw.status();
    std::vector<uint16_t> xh(static_cast<size_t>(300 * 4096));
    std::normal_distribution<float> nd;
    for (auto& v : xh) v = FloatToHalf(nd(rng));
    DevBuf<uint16_t> dx(xh.size());
    dx.Up(xh);
    DevBuf<float> dy(static_cast<size_t>(300 * 1100));
    cuda::W4CudaParams p = prefill_params(dx.get(), 300, 4096, dy.get(), 1100, 3);
    for (const int kernel : {3, 3 | 128, 2 | 128}) {
      p.prefill_kernel = kernel;
      std::vector<float> one_split, four;
      for (const int splits : {1, 4, 4, 2, 4}) {
        p.prefill_splits = splits;
        dy.Poison();
        ASSERT_TRUE(cuda::W4Linear(**dw, p, ws->get(), nullptr).ok()) << kernel << " " << splits;
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> out = dy.Down();
        if (splits == 1) {
          one_split = out;
          continue;
        }
        if (splits == 4 && four.empty()) {
          four = out;
        } else if (splits == 4) {
          ASSERT_EQ(std::memcmp(four.data(), out.data(), out.size() * 4), 0) << "split 4 twice";
        }
        for (size_t i = 0; i < out.size(); ++i) {
          ASSERT_NEAR(out[i], one_split[i], 1e-4 * (1 + std::fabs(one_split[i])))
              << "kernel " << kernel << " splits " << splits << " " << i;
        }
      }
    }
    // v36: the stream-K kernel: bitwise the same output on every run (its
    // pieces are added in block order), close to the unsplit kernel's; 1100
    // x 300 x 4096 at 256 tokens: 2 x 9 tiles of 32 stage pairs over 72
    // blocks (4 per tile), at 128 tokens 3 x 9 tiles over 108.
    for (const int kernel : {3 | 128 | 256, 2 | 128 | 256}) {
      p.prefill_kernel = kernel & ~256;
      p.prefill_splits = 1;
      dy.Poison();
      ASSERT_TRUE(cuda::W4Linear(**dw, p, ws->get(), nullptr).ok());
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<float> unsplit = dy.Down();
      p.prefill_kernel = kernel;
      // v38: prefill_splits caps the pieces per stream-K tile (2, 3; 0, 1
      // and 4: 4); each cap twice, bitwise the same.
      std::vector<float> first[5];
      for (const int cap : {1, 2, 3, 4, 0, 2, 1, 3}) {
        p.prefill_splits = cap;
        const int c = cap < 2 ? 4 : cap;
        dy.Poison();
        ASSERT_TRUE(cuda::W4Linear(**dw, p, ws->get(), nullptr).ok()) << kernel << " " << cap;
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> out = dy.Down();
        if (first[c].empty()) {
          first[c] = out;
          for (size_t i = 0; i < out.size(); ++i) {
            ASSERT_NEAR(out[i], unsplit[i], 1e-4 * (1 + std::fabs(unsplit[i])))
                << "stream-K kernel " << kernel << " cap " << cap << " " << i;
          }
        } else {
          ASSERT_EQ(std::memcmp(first[c].data(), out.data(), out.size() * 4), 0)
              << "stream-K kernel " << kernel << " cap " << cap << " again";
        }
      }
      // The cap reaches the kernel: tiles cut in 4 pieces or in 2 group
      // their fp32 sums differently, so some of the 330,000 outputs round
      // differently (with the cap ignored the two would be the same bits).
      EXPECT_NE(std::memcmp(first[2].data(), first[4].data(), first[2].size() * 4), 0)
          << "stream-K kernel " << kernel << ": caps 2 and 4 gave the same bits";
      // more than 4 pieces: InvalidArgument (W4Linear's check).
      p.prefill_splits = 5;
      EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(),
                absl::StatusCode::kInvalidArgument);
    }
    p.prefill_kernel = 3 | 256;  // stream-K without warp specialization
    p.prefill_splits = 0;
    EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(), absl::StatusCode::kInvalidArgument);
    p.prefill_kernel = 3;
    // Splits that leave a split empty, or out of range: InvalidArgument.
    p.prefill_splits = 5;
    EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(), absl::StatusCode::kInvalidArgument);
    const W4Weight ws_short = RandomW4(200, 256, 64, false, false, rng);
    auto dshort = cuda::W4DeviceWeight::Create(ws_short, nullptr);
    ASSERT_TRUE(dshort.ok());
    p.prefill_splits = 4;  // k = 256: 4 stages, so at most 2 splits (2 stages each)
    p.ldx = 256;
    p.ldy = 200;
    EXPECT_EQ(cuda::W4Linear(**dshort, p, ws->get(), nullptr).code(),
              absl::StatusCode::kInvalidArgument);
  }
  // k = 1001 (x rows not 16-byte aligned): automatic = the dequantizing path.
  Case c{96, 1001, 1001, 140};
  c.force_prefill = true;
  c.bias = true;
  RunCase(c, rng, ws->get());
  if (HasFatalFailure() || major != 9) return;
  // Forced wgmma there: InvalidArgument, nothing written.
  const W4Weight w = RandomW4(96, 1001, 1001, false, false, rng);
  auto dw = cuda::W4DeviceWeight::Create(w, nullptr);
  ASSERT_TRUE(dw.ok()) << dw.status();
  DevBuf<uint16_t> dx(140 * 1001);
  DevBuf<float> dy(140 * 96);
  cuda::W4CudaParams p = prefill_params(dx.get(), 140, 1001, dy.get(), 96, 2);
  EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.prefill_kernel = 4;
  EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// v44: the warp-specialized wgmma kernel with 64- / 32- / 16-token tiles
// (prefill_kernel 4 / 5 / 6 + 128; two blocks per SM, eight stages), for
// decode-sized m: m inside one tile, exactly one, one past it (two token
// tiles), shapes off the 128-row block tile (n = 200, 72, 1100) and off the
// 64-k stage (k = 1000), per-channel and grouped scales, forced k splits,
// the EC (through the prefill path), bias, accumulation and fp16 output.
TEST(CudaW4, SmallTokenTilesMatchReference) {
  SKIP_WITHOUT_GPU();
  int major = 0;
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major != 9) {
    GTEST_SKIP() << "the wgmma kernels need sm_90; device is sm_" << major << "0";
  }
  std::mt19937 rng(Seed() + 44);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct S {
    int64_t n, k, g;
  };
  const S shapes[] = {{200, 256, 64}, {384, 1000, 1000}, {1100, 1024, 128}, {72, 14336, 128}};
  int v = 0;
  for (const auto& [kernel, tokens] : {std::pair{4 | 128, 64}, std::pair{5 | 128, 32},
                                       std::pair{6 | 128, 16}}) {
    for (const int64_t m : {int64_t{1}, int64_t{3}, int64_t{tokens - 1}, int64_t{tokens},
                            int64_t{tokens + 1}, int64_t{2 * tokens + 5}}) {
      const S& sh = shapes[v % 4];
      Case c{sh.n, sh.k, sh.g, m};
      c.force_prefill = true;
      c.prefill_kernel = kernel;
      // k splits: none, or 2..4 where they fit (k = 256: 4 stages, 2 at most)
      c.prefill_splits = v % 4 == 0 ? 0 : sh.k == 256 ? 2 : 2 + v % 3;
      c.ec = v % 3;
      c.act_scale = v % 5 == 1;
      c.bias = v % 2 == 0;
      c.accumulate = v % 3 == 2;
      c.f16_out = v % 4 == 3;
      c.symmetric = v % 7 == 4;
      c.ldy_pad = v % 2 == 0 ? 0 : 3;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  // The automatic dispatch (no force): 17..63 rows run the small tiles
  // (W4CudaParams::small_tiles, 32 tokens up to 32 rows, else 64), k = 1001
  // and x rows not 16-byte aligned (ldx_pad 3) the decode kernels; the gate
  // values are checked too.
  for (const int64_t m : {17, 32, 33, 40, 63}) {
    for (const S& sh : {S{2112, 2048, 128}, S{576, 1000, 1000}, S{96, 1001, 1001}}) {
      Case c{sh.n, sh.k, sh.g, m};
      c.ec = 2;
      c.bias = v % 2 == 0;
      c.accumulate = v % 3 == 2;
      c.f16_out = v % 4 == 3;
      c.ldx_pad = v % 5 == 4 ? 3 : 0;
      c.gate_pad = v % 3;
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  // Forms the small tiles do not take: InvalidArgument, nothing enqueued.
  const W4Weight w = RandomW4(200, 256, 64, false, false, rng);
  auto dw = cuda::W4DeviceWeight::Create(w, nullptr);
  ASSERT_TRUE(dw.ok()) << dw.status();
  DevBuf<uint16_t> dx(40 * 256);
  DevBuf<float> dy(40 * 200);
  cuda::W4CudaParams p;
  p.x = dx.get();
  p.m = 40;
  p.ldx = 256;
  p.y_f32 = dy.get();
  p.ldy = 200;
  p.force_prefill = true;
  for (const int bad : {4, 5, 6, 4 | 128 | 256, 5 | 96 | 128, 6 | 64, 7 | 128, 4 | 32}) {
    p.prefill_kernel = bad;
    EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(),
              absl::StatusCode::kInvalidArgument)
        << "prefill_kernel " << bad;
  }
  p.prefill_kernel = 0;
  p.force_prefill = false;
  for (const int bad : {-1, 3}) {
    p.small_tiles = bad;
    EXPECT_EQ(cuda::W4Linear(**dw, p, ws->get(), nullptr).code(),
              absl::StatusCode::kInvalidArgument)
        << "small_tiles " << bad;
  }
}

// v49: x = RMSNorm(h) inside the call (W4CudaParams::norm_h) gives the
// bits of RmsNormF16 then W4Linear, on the fold kernel at one row (4- and
// 8-warp blocks, warp groups, k splits; EC none / static / gated in the
// one-cluster prologue), where it falls back to a norm launch (two and
// five rows, k % 8 != 0, k > 4096, the v27 prologue, a forced non-fold
// kernel) and captured in a graph; norm_x_out is untouched exactly where
// the kernels normalize themselves.
TEST(CudaW4, NormInKernelsMatchesNormApart) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 49);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g;
  };
  const Shape shapes[] = {{6144, 4096, 128}, {1536, 576, 64}, {2048, 2048, 2048},
                          {640, 1000, 1000}, {512, 8192, 128}};
  std::normal_distribution<float> nd;
  for (const Shape& sh : shapes) {
    const W4Weight w = RandomW4(sh.n, sh.k, sh.g, false, false, rng);
    const EcWeights ecg = RandomEc(sh.n, sh.k, 24, 16, true, rng);
    const EcWeights ecs = RandomEc(sh.n, sh.k, 24, 16, false, rng);
    for (const XCallForm& f : kXCallForms) {
      SCOPED_TRACE(absl::StrCat("n=", sh.n, " k=", sh.k, " m=", f.m, " ec=", f.ec,
                                " dk=", f.decode_kernel, " splits=", f.decode_splits,
                                " prologue=", f.ec_prologue));
      auto dw = cuda::W4DeviceWeight::Create(w, f.ec == 2 ? &ecg : f.ec == 1 ? &ecs : nullptr);
      ASSERT_TRUE(dw.ok()) << dw.status();
      const int64_t m = f.m, k = sh.k, ldh = k + 4, ldx = k + 8;
      std::vector<float> h(static_cast<size_t>(m * ldh)), nw(static_cast<size_t>(k));
      for (auto& v : h) v = 3.f * nd(rng);
      for (auto& v : nw) v = 1.f + 0.25f * nd(rng);
      DevBuf<float> dh(h.size()), dnw(nw.size());
      dh.Up(h);
      dnw.Up(nw);
      DevBuf<uint16_t> xa(static_cast<size_t>(m * ldx)), xb(static_cast<size_t>(m * ldx));
      xa.Poison();
      xb.Poison();
      cuda::RmsNormF16Params rn;
      rn.x = dh.get();
      rn.weight = dnw.get();
      rn.y = xa.get();
      rn.m = m;
      rn.d = k;
      rn.ldx = ldh;
      rn.ldy = ldx;
      rn.eps = 1e-5f;
      ASSERT_TRUE(cuda::RmsNormF16(rn, nullptr).ok());
      const bool in_kernels = m == 1 && k % 8 == 0 && k <= 4096 && f.decode_kernel != 3 &&
                              !(f.ec != 0 && f.ec_prologue == 16);
      CheckXInCall(
          **dw, ws->get(), f, sh.n, k, ldx, xa, xb,
          [&](cuda::W4CudaParams* q) {
            q->norm_h = dh.get();
            q->norm_weight = dnw.get();
            q->norm_ld = ldh;
            q->norm_eps = 1e-5f;
            q->norm_x_out = xb.get();
          },
          in_kernels, in_kernels && f.ec == 2 && k == 4096);
      if (HasFatalFailure()) return;
    }
  }
}

// v51: x = SiluMul(gate, up) of a gate_up row inside the call
// (W4CudaParams::swiglu_gu) gives the bits of SiluMul then W4Linear, on the
// fold kernel at one row with an EC (4- and 8-warp blocks, k splits, warp
// groups; static and gated ECs in the one-cluster prologue; k up to 14336,
// the 8B down GEMM), where it falls back to a SiluMul launch (no EC, two and five rows,
// k % 8 != 0, the v27 prologue, a forced non-fold kernel) and captured in a
// graph; swiglu_x_out is untouched exactly where the kernels compute x.
TEST(CudaW4, SwigluInKernelsMatchesSwigluApart) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 51);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g;
  };
  const Shape shapes[] = {{4096, 14336, 128}, {576, 1536, 64}, {2048, 8192, 128},
                          {640, 1000, 1000}, {512, 1004, 1004}};
  // (+ warp groups with an EC: without one SwiGLU is not computed in the call)
  std::vector<XCallForm> forms(std::begin(kXCallForms), std::end(kXCallForms));
  forms.push_back({1, 2, 5 | 512, 0, 0});
  std::normal_distribution<float> nd;
  for (const Shape& sh : shapes) {
    const W4Weight w = RandomW4(sh.n, sh.k, sh.g, false, false, rng);
    const EcWeights ecg = RandomEc(sh.n, sh.k, 24, 16, true, rng);
    const EcWeights ecs = RandomEc(sh.n, sh.k, 24, 16, false, rng);
    for (const XCallForm& f : forms) {
      SCOPED_TRACE(absl::StrCat("n=", sh.n, " k=", sh.k, " m=", f.m, " ec=", f.ec,
                                " dk=", f.decode_kernel, " splits=", f.decode_splits,
                                " prologue=", f.ec_prologue));
      auto dw = cuda::W4DeviceWeight::Create(w, f.ec == 2 ? &ecg : f.ec == 1 ? &ecs : nullptr);
      ASSERT_TRUE(dw.ok()) << dw.status();
      const int64_t m = f.m, k = sh.k, ldgu = 2 * k + 8, ldx = k + 8;
      // gate in [-8, 8] (silu's both tails), up ~ N(0, 1)
      std::vector<uint16_t> gu(static_cast<size_t>(m * ldgu));
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < ldgu; ++j) {
          gu[i * ldgu + j] = FloatToHalf(j < k ? 8.f * std::tanh(nd(rng)) : nd(rng));
        }
      }
      DevBuf<uint16_t> dgu(gu.size());
      dgu.Up(gu);
      DevBuf<uint16_t> xa(static_cast<size_t>(m * ldx)), xb(static_cast<size_t>(m * ldx));
      xa.Poison();
      xb.Poison();
      cuda::SiluMulF16Params sm;
      sm.gate = dgu.get();
      sm.up = dgu.get() + k;
      sm.y = xa.get();
      sm.m = m;
      sm.n = k;
      sm.ld_gate = sm.ld_up = ldgu;
      sm.ldy = ldx;
      ASSERT_TRUE(cuda::SiluMul(sm, nullptr).ok());
      // (only with an EC: without one the SiluMul launch is the cheaper form)
      const bool in_kernels = m == 1 && k % 8 == 0 && f.decode_kernel != 3 && f.ec != 0 &&
                              f.ec_prologue != 16;
      CheckXInCall(
          **dw, ws->get(), f, sh.n, k, ldx, xa, xb,
          [&](cuda::W4CudaParams* q) {
            q->swiglu_gu = dgu.get();
            q->swiglu_ld = ldgu;
            q->swiglu_x_out = xb.get();
          },
          in_kernels, in_kernels && f.ec == 2 && k == 14336);
      if (HasFatalFailure()) return;
    }
  }
}

// The split-K fix-up sums partials in block order: bitwise the same twice.
TEST(CudaW4, DecodeIsDeterministic) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 2);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok());
  const int64_t n = 256, k = 8192, m = 5;
  const W4Weight w = RandomW4(n, k, 128, false, false, rng);
  const EcWeights ec = RandomEc(n, k, 32, 16, true, rng);
  auto dw = cuda::W4DeviceWeight::Create(w, &ec);
  ASSERT_TRUE(dw.ok());
  std::vector<uint16_t> xh(static_cast<size_t>(m * k));
  std::normal_distribution<float> nd;
  for (auto& v : xh) v = FloatToHalf(nd(rng));
  DevBuf<uint16_t> dx(xh.size());
  dx.Up(xh);
  DevBuf<float> y(static_cast<size_t>(m * n));
  cuda::W4CudaParams p;
  p.x = dx.get();
  p.m = m;
  p.ldx = k;
  p.y_f32 = y.get();
  p.ldy = n;
  std::vector<float> first;
  for (int rep = 0; rep < 5; ++rep) {
    y.Poison();
    ASSERT_TRUE(cuda::W4Linear(**dw, p, ws->get(), nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> out = y.Down();
    if (rep == 0) {
      first = out;
    } else {
      ASSERT_EQ(std::memcmp(first.data(), out.data(), out.size() * 4), 0) << "rep " << rep;
    }
  }
}

// The fold kernel's EC (m <= 8) on shapes the other EC cases miss: gated
// and static ECs, ranks 8..64 (48: padded to 64), one and several k ranges
// (k 1000 .. 14336), 4- and 8-warp blocks with k splits, the persistent
// loop (n = 20000: more tiles than one wave), gate_out rows strided; at
// m = 1 in both prologue forms (v47's one cluster, the default there, and
// the v27 form, ec_prologue 16; k = 14336 takes 8 slices of 1792).
// (Written for v45, the gate in the fold kernel's EC blocks; measured
// slower and reverted: docs/results/gpu.md, "v45".)
TEST(CudaW4, FoldEcShapesMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 45);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g, r, h;
    int dk, splits;  // decode_kernel (4 / 5: 4 / 8 warps), decode_splits (0: automatic)
  };
  const Shape shapes[] = {{192, 1000, 1000, 8, 16, 0, 0},   {256, 4096, 128, 32, 16, 0, 0},
                          {4096, 14336, 128, 32, 16, 0, 0}, {640, 4096, 4096, 48, 16, 4, 2},
                          {20000, 2048, 128, 16, 8, 0, 0},  {320, 8192, 64, 64, 32, 5, 4}};
  int v = 0;
  for (const Shape& sh : shapes) {
    for (int gated = 0; gated < 2; ++gated) {
      Case c{sh.n, sh.k, sh.g, 1 + (v * 3) % 8};
      ++v;
      c.ec = gated == 1 ? 2 : 1;
      c.ec_rank = sh.r;
      c.ec_hidden = sh.h;
      c.force_decode = true;
      c.decode_kernel = sh.dk;
      c.decode_splits = sh.splits;
      c.gate_pad = 3;
      c.bias = v % 2 == 0;
      c.f16_out = v % 3 == 0;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
      if (c.m == 1) {
        c.ec_prologue = 16;
        RunCase(c, rng, ws->get());
        if (HasFatalFailure()) return;
      }
    }
  }
}

// int8 ECs (EcFactors::kI8, as `spear quantize --ec-factors i8` stores them)
// served from their codes: B's tile records as int8 + per-(tile, rank)
// scales in every kernel with an EC epilogue (the fold kernel with B through
// shared memory and from global memory (flag 128), 4 / 8 warps, k splits;
// the swapped kernels (1, 2 = v7 / v8 forms); the x-as-m16 kernel (3, and
// 17 / 33 / 64 / 65 rows); the small token tiles and prefill paths, which
// unpack A and B), A's codes in every prologue form (one cluster at one row,
// v27's, v12's (1), v27's at one row (16), the scalar path of x rows off 16
// bytes), in the four forms of MakeEcForm, odd and large ranks, a ragged
// last tile (n = 1000, 200); form 4 (module boundaries off the 64-column
// groups) must fall back to fp16 records and stay right. The device copy's
// EC bytes are checked: A and B one byte per value + fp16 scales, the gate
// fp32.
TEST(CudaW4, Int8EcMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 46);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok()) << ws.status();
  struct Shape {
    int64_t n, k, g, r;
  };
  const Shape shapes[] = {{576, 576, 64, 6},   {1000, 1000, 1000, 7}, {200, 384, 32, 4},
                          {4096, 4096, 128, 8}, {1536, 2048, 128, 33}, {640, 4096, 4096, 100},
                          {72, 1001, 1001, 5}};  // k % 8 != 0: A served as fp16
  const int64_t ms[] = {1, 3, 8, 12, 16, 17, 33, 65, 130};
  const int dks[] = {0, 4, 5, 5 | 128, 1, 2, 3};
  int v = 0;
  for (const Shape& sh : shapes) {
    for (int64_t m : ms) {
      Case c{sh.n, sh.k, sh.g, m};
      c.ec = v % 2 == 0 ? 2 : 1;
      c.ec_rank = sh.r;
      c.ec_form = 1 + v % 4;
      c.bias = v % 3 == 0;
      c.f16_out = v % 5 == 2;
      c.accumulate = v % 4 == 1;
      // the prologue's forms: v12's (1), v27's at one row (16); x rows off
      // 16 bytes (ldx = k + 3: its scalar path)
      c.ec_prologue = v % 6 == 5 ? 1 : (v % 6 == 4 && m == 1) ? 16 : 0;
      c.ldx_pad = v % 7 == 6 ? 3 : 0;
      if (m == 130) {
        c.force_prefill = true;
      } else if (m == 17 || m == 33) {
        // the automatic path (the small token tiles where they run)
      } else {
        c.force_decode = true;
        c.decode_kernel = m <= 16 ? dks[v % 7] : 0;
      }
      ++v;
      RunCase(c, rng, ws->get());
      if (HasFatalFailure()) return;
    }
  }
  // The bytes: a compact int8 EC of rank 8 on 4096 x 4096.
  const W4Weight w = RandomW4(4096, 4096, 128, false, false, rng);
  EcWeights ec = RandomEc(4096, 4096, 8, 16, true, rng);
  MakeEcForm(2, &ec);
  ASSERT_FALSE(HasFatalFailure());
  auto dw = cuda::W4DeviceWeight::Create(w, &ec);
  ASSERT_TRUE(dw.ok()) << dw.status();
  auto lay = BuildEcTileLayoutI8(ec.i8.b.data(), ec.i8.b_scales.data(), 4096, 8);
  ASSERT_TRUE(lay.ok()) << lay.status();
  EXPECT_EQ(lay->bytes(), size_t{4096 * 8 + 64 * 8 * 2});
  // A: codes + one fp16 scale per 64 (64 groups a row); the gate fp32
  EXPECT_EQ((*dw)->ec_bytes(),
            size_t{8 * 4096 + 8 * 64 * 2} + lay->bytes() + 4 * (16 * 8 * 2 + 16 + 8));
  EXPECT_NE((*dw)->impl().ec_a8, nullptr);
}

// v36: the tuners' input fill: N(0, 1) in distribution (mean, variance,
// tails), no element repeating its neighbour or the element 64 Ki before
// it more than chance allows (TunePrefill's first x was a 64 Ki block
// repeated), the same bits for the same seed, others for another.
TEST(CudaW4, FillNormalLooksStandardNormal) {
  SKIP_WITHOUT_GPU();
  const size_t n = (size_t{1} << 20) + 7;
  DevBuf<uint16_t> d(n);
  ASSERT_TRUE(cuda::LaunchFillNormal(d.get(), n, 12345u, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<uint16_t> a = d.Down();
  double sum = 0, sq = 0;
  size_t tail = 0, same = 0, same_far = 0;
  for (size_t i = 0; i < n; ++i) {
    const double v = HalfToFloat(a[i]);
    ASSERT_TRUE(std::isfinite(v)) << i;
    sum += v;
    sq += v * v;
    tail += std::fabs(v) > 3 ? 1 : 0;
    same += i > 0 && a[i] == a[i - 1] ? 1 : 0;
    same_far += i >= 65536 && a[i] == a[i - 65536] ? 1 : 0;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  EXPECT_LT(std::fabs(mean), 0.01);
  EXPECT_NEAR(var, 1.0, 0.02);
  EXPECT_NEAR(static_cast<double>(tail) / n, 0.0027, 0.0006);  // P(|z| > 3)
  EXPECT_LT(same, n / 200) << "neighbours equal";
  EXPECT_LT(same_far, n / 200) << "elements 64 Ki apart equal";
  ASSERT_TRUE(cuda::LaunchFillNormal(d.get(), n, 12345u, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(d.Down(), a);
  ASSERT_TRUE(cuda::LaunchFillNormal(d.get(), n, 777u, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_NE(d.Down(), a);
}

// CaptureGraph (the runner's and TunePrefill's capture): the enqueue's own
// error comes back unchanged and leaves the stream out of capture mode and
// usable; a captured fill replays with the captured effect.
TEST(CudaW4, CaptureGraphReturnsErrorsAndReplays) {
  SKIP_WITHOUT_GPU();
  cudaStream_t s = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const size_t n = 4099;
  DevBuf<uint16_t> d(n);
  absl::StatusOr<cudaGraphExec_t> bad = cuda::CaptureGraph(s, [&]() -> absl::Status {
    if (absl::Status st = cuda::LaunchFillNormal(d.get(), n, 1u, s); !st.ok()) return st;
    return absl::InvalidArgumentError("refused on purpose");
  });
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "refused on purpose");
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusActive;
  CUDA_OK(cudaStreamIsCapturing(s, &cs));
  EXPECT_EQ(cs, cudaStreamCaptureStatusNone);
  CUDA_OK(cudaMemsetAsync(d.get(), 0, n * 2, s));  // the stream still runs work
  absl::StatusOr<cudaGraphExec_t> good =
      cuda::CaptureGraph(s, [&] { return cuda::LaunchFillNormal(d.get(), n, 9u, s); });
  ASSERT_TRUE(good.ok()) << good.status();
  CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(d.Down(), std::vector<uint16_t>(n, 0)) << "capture must not run the work";
  CUDA_OK(cudaGraphLaunch(*good, s));
  CUDA_OK(cudaStreamSynchronize(s));
  const std::vector<uint16_t> replayed = d.Down();
  ASSERT_TRUE(cuda::LaunchFillNormal(d.get(), n, 9u, s).ok());
  CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(replayed, d.Down());
  EXPECT_NE(replayed, std::vector<uint16_t>(n, 0));
  CUDA_OK(cudaGraphExecDestroy(*good));
  CUDA_OK(cudaStreamDestroy(s));
}

// Captured into a CUDA graph and replayed: same result as a direct call
// (decode m = 16; prefill m = 200, its EC on the workspace's second stream);
// the naive path (W4 without EC, EcGate, EcApply) agrees with the fused one.
TEST(CudaW4, GraphReplayAndNaivePathAgree) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 3);
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok());
  const int64_t n = 1536, k = 576;
  const W4Weight w = RandomW4(n, k, 64, false, false, rng);
  const EcWeights ec = RandomEc(n, k, 32, 16, true, rng);
  auto dw = cuda::W4DeviceWeight::Create(w, &ec);
  ASSERT_TRUE(dw.ok());
  // m = 16: the decode kernel; m = 200: the prefill path, whose EC forks
  // onto the workspace's second stream and joins back (inside the capture).
  for (const int64_t m : {int64_t{16}, int64_t{200}}) {
    std::vector<uint16_t> xh(static_cast<size_t>(m * k));
    std::normal_distribution<float> nd;
    for (auto& v : xh) v = FloatToHalf(nd(rng));
    DevBuf<uint16_t> dx(xh.size());
    dx.Up(xh);
    DevBuf<float> y1(static_cast<size_t>(m * n)), y2(static_cast<size_t>(m * n)),
        v(static_cast<size_t>(m * 32));
    cuda::W4CudaParams p;
    p.x = dx.get();
    p.m = m;
    p.ldx = k;
    p.y_f32 = y1.get();
    p.ldy = n;
    p.prefill_ec_stream = m > 64 ? 2 : 0;  // forced: this shape is below the automatic cut
    ASSERT_TRUE(cuda::W4Linear(**dw, p, ws->get(), nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> direct = y1.Down();

    y1.Poison();
    CaptureAndReplay(**dw, p, ws->get(), 3);
    if (HasFatalFailure()) return;
    const std::vector<float> replay = y1.Down();
    if (m <= 64) {
      ASSERT_EQ(std::memcmp(direct.data(), replay.data(), replay.size() * 4), 0);
    } else {
      // cuBLAS may pick another algorithm on another stream: 1e-5 relative.
      double ss = 0, se = 0;
      for (size_t i = 0; i < direct.size(); ++i) {
        ss += double{direct[i]} * direct[i];
        se += double{replay[i] - direct[i]} * (replay[i] - direct[i]);
      }
      ASSERT_LE(std::sqrt(se / ss), 1e-5) << "m " << m;
    }

    y2.Poison();
    cuda::W4CudaParams q = p;
    q.y_f32 = y2.get();
    q.use_ec = false;
    ASSERT_TRUE(cuda::W4Linear(**dw, q, ws->get(), nullptr).ok());
    ASSERT_TRUE(cuda::EcGate(**dw, dx.get(), m, k, v.get(), ws->get(), nullptr).ok());
    ASSERT_TRUE(cuda::EcApply(**dw, v.get(), m, y2.get(), nullptr, n, nullptr).ok());
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<float> naive = y2.Down();
    double ss = 0, se = 0;
    for (size_t i = 0; i < naive.size(); ++i) {
      ss += double{direct[i]} * direct[i];
      se += double{naive[i] - direct[i]} * (naive[i] - direct[i]);
    }
    EXPECT_LE(std::sqrt(se / ss), 1e-3) << "m " << m;
  }
}

TEST(CudaW4, RejectsUnsupportedAndBadParams) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed() + 4);
  EXPECT_FALSE(cuda::IsSupported({64, 96, 48, false}));   // group 48
  EXPECT_FALSE(cuda::IsSupported({64, 384, 192, false}));  // 192: not a power of two
  EXPECT_TRUE(cuda::IsSupported({64, 100, 100, false}));   // per-channel, any k
  EXPECT_TRUE(cuda::IsSupported({64, 512, 256, true}));
  const W4Weight bad = RandomW4(64, 96, 48, false, false, rng);
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4DeviceWeight::Create(bad, nullptr).status()));
  const W4Weight w = RandomW4(64, 128, 64, false, false, rng);
  auto dw = cuda::W4DeviceWeight::Create(w, nullptr);
  ASSERT_TRUE(dw.ok());
  auto ws = cuda::W4Workspace::Create();
  ASSERT_TRUE(ws.ok());
  DevBuf<uint16_t> x(128);
  DevBuf<float> y(64);
  cuda::W4CudaParams p;
  p.x = x.get();
  p.m = 1;
  p.ldx = 128;
  p.ldy = 64;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));  // no y
  p.y_f32 = y.get();
  p.ldx = 100;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));  // ldx < k
  p.ldx = 128;
  p.decode_kernel = 6;  // the removed bulk-copy ring of the fold kernel
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  p.decode_kernel = 6 | 64;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  // v40: warp groups only with the fold kernel forced, at most one per warp;
  // unknown flags
  for (int dk : {0 | 256, 3 | 256, 4 | 768, 5 | 1024, 5 | 4096}) {
    p.decode_kernel = dk;
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr))) << dk;
  }
  p.decode_kernel = 0;
  // v41: a measured tuning that is no fold configuration (set by hand)
  for (const cuda::W4DeviceWeight::DecodeTuning t :
       {cuda::W4DeviceWeight::DecodeTuning{4, 1, 2, 8}, {8, 1, 2, 3}, {6, 1, 2, 0}}) {
    (*dw)->set_decode_tuning(1, t);
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)))
        << t.warps << "/" << t.groups;
  }
  (*dw)->set_decode_tuning(1, {});
  p.ec_prologue = 12;  // 4 and 8 together
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  p.ec_prologue = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  p.ec_prologue = 32;  // no such flag (v27 without its loads before the wait, removed)
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  p.ec_prologue = 8192;  // no such flag (v61's early trigger: refuted, not merged)
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  p.ec_prologue = 0;
  {  // v49: x = RMSNorm(h) with x also given, or a norm row stride below k
    cuda::W4CudaParams q = p;
    q.norm_h = reinterpret_cast<const float*>(p.x);
    q.norm_weight = q.norm_h;
    q.norm_ld = 1 << 20;
    q.norm_x_out = const_cast<uint16_t*>(p.x);
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, q, ws->get(), nullptr)));
    q.x = nullptr;
    q.norm_ld = 1;
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, q, ws->get(), nullptr)));
    q.norm_ld = 1 << 20;  // and each of the others: no weight, no x_out, a bad eps
    for (int bad = 0; bad < 3; ++bad) {
      cuda::W4CudaParams b = q;
      if (bad == 0) b.norm_weight = nullptr;
      if (bad == 1) b.norm_x_out = nullptr;
      if (bad == 2) b.norm_eps = -1.f;
      EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, b, ws->get(), nullptr))) << bad;
    }
    // v51: and a SwiGLU row besides the norm
    q.swiglu_gu = p.x;
    q.swiglu_ld = 1 << 20;
    q.swiglu_x_out = const_cast<uint16_t*>(p.x);
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, q, ws->get(), nullptr)));
  }
  {  // v51: x = SiluMul(gate_up) with x also given, no x_out, a row stride below 2k
    cuda::W4CudaParams q = p;
    q.swiglu_gu = p.x;
    q.swiglu_ld = 1 << 20;
    q.swiglu_x_out = const_cast<uint16_t*>(p.x);
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, q, ws->get(), nullptr)));
    q.x = nullptr;
    for (int bad = 0; bad < 2; ++bad) {
      cuda::W4CudaParams b = q;
      if (bad == 0) b.swiglu_x_out = nullptr;
      if (bad == 1) b.swiglu_ld = 2 * (*dw)->fmt().k - 1;
      EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, b, ws->get(), nullptr))) << bad;
    }
  }
  {  // W4LinearXApart (the producer alone): exactly one of norm_h / swiglu_gu
    cuda::W4CudaParams q;
    q.m = 1;
    q.ldx = 128;
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4LinearXApart(q, 128, false, nullptr)));
    q.norm_h = reinterpret_cast<const float*>(p.x);
    q.swiglu_gu = p.x;
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4LinearXApart(q, 128, false, nullptr)));
  }
  p.gate_ld = -1;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  {  // a gate row stride below the EC's rank
    std::mt19937 erng(5);
    const EcWeights ec = RandomEc(64, 128, 8, 4, true, erng);
    auto dwe = cuda::W4DeviceWeight::Create(w, &ec);
    ASSERT_TRUE(dwe.ok());
    // Device memory: the decode layout's bytes, B once (its tile records:
    // one tile, 4 rank pairs, fp16) + A fp16 + the gate fp32.
    EXPECT_EQ((*dwe)->device_bytes(), (*dwe)->backbone_bytes() + (*dwe)->ec_bytes());
    EXPECT_EQ((*dwe)->ec_bytes(), size_t{4 * 8 * 32 + 8 * 128 * 2 + 4 * (4 * 8 * 2 + 4 + 8)});
    EXPECT_EQ((*dw)->device_bytes(), (*dw)->backbone_bytes());
    p.gate_ld = 7;
    EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dwe, p, ws->get(), nullptr)));
  }
  p.gate_ld = 0;
  p.x = nullptr;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::W4Linear(**dw, p, ws->get(), nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::EcApply(**dw, nullptr, 1, y.get(), nullptr, 64, nullptr)));
}

}  // namespace
}  // namespace spear::kernels
