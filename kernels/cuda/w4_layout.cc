// W4DeviceWeight::Create: the logical W4 (+EC) format re-laid into the
// GPU layout of w4_layout.h on the host, then uploaded. Also IsSupported,
// NumSms and the W4Workspace allocation.
#include "kernels/cuda/w4_layout.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels/cuda/cublas_loader.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"

namespace spear::kernels::cuda {
namespace {

template <typename T>
absl::Status Upload(const std::vector<T>& h, T** d) {
  *d = nullptr;
  if (h.empty()) return absl::OkStatus();
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(d), h.size() * sizeof(T)));
  SPEAR_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(*d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

std::vector<uint16_t> ToHalf(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = FloatToHalf(v[i]);
  return h;
}

// The int8 factors of an int8 EC: its own (compact), or its values encoded
// again (a merged EC: rows of A stacked, B block-diagonal); null for fp16.
// `given` is the EC as passed, `ec` its float form.
const EcI8Factors* I8Factors(const EcWeights& given, const EcWeights& ec, EcI8Factors* enc) {
  if (given.factors != EcFactors::kI8) return nullptr;
  if (given.compact_i8()) return &given.i8;
  return EncodeEcFactorsI8(ec, enc).ok() ? enc : nullptr;
}

// B in the tile layout: int8 records where the codes give B's values
// exactly (for a merged EC that holds where each module's columns start on
// a 64-column group, as in every Llama shape), else fp16 records.
absl::StatusOr<EcTileLayout> BLayout(const EcI8Factors* f, const EcWeights& ec) {
  if (f != nullptr) {
    auto l = BuildEcTileLayoutI8(f->b.data(), f->b_scales.data(), ec.n, ec.rank);
    if (!l.ok()) return l.status();
    bool exact = true;
    for (int64_t c = 0; c < ec.n && exact; ++c) {
      for (int64_t q = 0; q < ec.rank && exact; ++q) {
        exact = l->Value(c, q) == ec.b[static_cast<size_t>(c * ec.rank + q)];
      }
    }
    if (exact) return l;
  }
  return BuildEcTileLayoutF16(ec.b.data(), ec.n, ec.rank);
}

// A's int8 codes where they give its values exactly and k % 8 == 0 (the
// prologue reads 8-code pieces), with the scales' rows padded to an even
// count (*ng); false: A goes fp16.
bool AInt8(const EcI8Factors* f, const EcWeights& ec, std::vector<uint16_t>* scales, int64_t* ng) {
  if (f == nullptr || ec.k % 8 != 0) return false;
  const int64_t g = EcI8Groups(ec.k), gp = RoundUp(g, 2);
  for (int64_t q = 0; q < ec.rank; ++q) {
    for (int64_t j = 0; j < ec.k; ++j) {
      const float v = static_cast<float>(f->a[static_cast<size_t>(q * ec.k + j)]) *
                      HalfToFloat(f->a_scales[static_cast<size_t>(q * g + j / kEcI8Group)]);
      if (v != ec.a[static_cast<size_t>(q * ec.k + j)]) return false;
    }
  }
  scales->assign(static_cast<size_t>(ec.rank * gp), 0);
  for (int64_t q = 0; q < ec.rank; ++q) {
    for (int64_t j = 0; j < g; ++j) (*scales)[q * gp + j] = f->a_scales[q * g + j];
  }
  *ng = gp;
  return true;
}

void SetTileArgs(const EcTileLayout& l, W4DeviceWeight::Impl* d) {
  EcTileArgs& e = d->ecb;
  e = EcTileArgs{};
  e.rec = d->ec_rec;
  e.scales = l.i8 ? d->ec_bscales : nullptr;
  e.rs = l.rs;
  e.nseg = l.nseg;
  for (int s = 0; s < kEcMaxSegs; ++s) {
    e.tile0[s] = l.tile0[s];
    e.q0[s] = l.q0[s];
    e.npairs[s] = l.npairs[s];
    e.rec0[s] = l.rec0[s];
  }
  e.max_steps = l.max_steps;
}

}  // namespace

bool IsSupported(const W4Format& f) {
  if (f.n <= 0 || f.k <= 0 || f.group_size <= 0) return false;
  if (f.n >= (int64_t{1} << 24) || f.k >= (int64_t{1} << 24)) return false;
  if (f.group_size >= f.k) return true;  // per-channel
  // A power of two >= 32: the kernels find a group with a shift.
  return f.group_size >= 32 && (f.group_size & (f.group_size - 1)) == 0;
}

int NumSms() {
  static int sms[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (sms[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) {
      v = 1;
    }
    sms[dev] = v;
  }
  return sms[dev];
}

W4DeviceWeight::W4DeviceWeight() : impl_(std::make_unique<Impl>()) {}

W4DeviceWeight::~W4DeviceWeight() {
  Impl& d = *impl_;
  for (void* p : {static_cast<void*>(d.qw), static_cast<void*>(d.sz),
                  static_cast<void*>(d.act_scale), static_cast<void*>(d.ec_a),
                  static_cast<void*>(d.ec_a8), static_cast<void*>(d.ec_ascales),
                  static_cast<void*>(d.ec_rec), static_cast<void*>(d.ec_bscales),
                  static_cast<void*>(d.w1), static_cast<void*>(d.b1), static_cast<void*>(d.w2),
                  static_cast<void*>(d.b2)}) {
    if (p != nullptr) cudaFree(p);
  }
}

absl::StatusOr<std::unique_ptr<W4DeviceWeight>> W4DeviceWeight::Create(const W4Weight& w,
                                                                       const EcWeights* ec) {
  // An int8 EC held compact on the host: A and the gate go to the device as
  // fp16 / fp32 like any other EC's (its values decoded exactly first), B as
  // its int8 codes (EcTileLayout).
  const EcWeights* given = ec;
  std::optional<EcWeights> decoded;
  if (ec != nullptr && ec->compact_i8()) {
    auto d = WithFloatFactors(*ec);
    if (!d.ok()) return d.status();
    decoded = std::move(*d);
    ec = &*decoded;
  }
  const W4Format& f = w.fmt;
  if (!IsSupported(f)) {
    return absl::InvalidArgumentError(absl::StrCat("cuda W4: unsupported format n=", f.n, " k=",
                                                   f.k, " group_size=", f.group_size));
  }
  const int64_t G = f.group_size, ng = (f.k + G - 1) / G;
  if (w.packed.size() != static_cast<size_t>(f.n * f.packed_row_bytes()) ||
      w.scales.size() != static_cast<size_t>(f.n * ng) ||
      w.zeros.size() != static_cast<size_t>(f.n * ng) ||
      (!w.act_scale.empty() && w.act_scale.size() != static_cast<size_t>(f.k))) {
    return absl::InvalidArgumentError("cuda W4: packed/scales/zeros/act_scale sizes");
  }
  if (ec != nullptr) {
    if (ec->n != f.n || ec->k != f.k || ec->rank <= 0 || ec->rank > kMaxRank ||
        ec->a.size() != static_cast<size_t>(ec->rank * f.k) ||
        ec->b.size() != static_cast<size_t>(f.n * ec->rank)) {
      return absl::InvalidArgumentError("cuda W4: EC shape (rank <= 256 on the GPU)");
    }
    if (ec->gated && (ec->gate_hidden <= 0 || ec->gate_hidden > kMaxRank ||
                      ec->w1.size() != static_cast<size_t>(ec->gate_hidden * ec->rank) ||
                      ec->b1.size() != static_cast<size_t>(ec->gate_hidden) ||
                      ec->w2.size() != static_cast<size_t>(ec->rank * ec->gate_hidden) ||
                      ec->b2.size() != static_cast<size_t>(ec->rank))) {
      return absl::InvalidArgumentError("cuda W4: EC gate shape");
    }
  }
  auto out = std::unique_ptr<W4DeviceWeight>(new W4DeviceWeight());
  out->fmt_ = f;
  Impl& d = *out->impl_;
  d.n = f.n;
  d.k = f.k;
  d.group = G;
  d.ngroups = ng;
  d.kp = RoundUp(f.k, kStageK);
  d.ksteps = d.kp / 16;
  d.nks = d.kp / kStageK;
  d.ntiles = (f.n + kTileN - 1) / kTileN;

  // Codes.
  std::vector<uint32_t> qw(static_cast<size_t>(d.ntiles * d.ksteps * 32 * 4), 0);
  auto code = [&](int64_t col, int64_t kk) -> uint32_t {
    if (col >= f.n || kk >= f.k) return 0;
    return w.Code(col, kk);
  };
  static constexpr int kNib[8][2] = {{0, 0}, {0, 8}, {1, 0}, {1, 8},
                                     {0, 1}, {0, 9}, {1, 1}, {1, 9}};  // nibble -> (dj, dk)
  for (int64_t t = 0; t < d.ntiles; ++t) {
    for (int64_t s = 0; s < d.ksteps; ++s) {
      for (int l = 0; l < 32; ++l) {
        const int gid = l / 4, tig = l % 4;
        for (int p = 0; p < 4; ++p) {
          uint32_t word = 0;
          for (int nib = 0; nib < 8; ++nib) {
            const int64_t col = t * kTileN + (2 * p + kNib[nib][0]) * 8 + gid;
            const int64_t kk = s * 16 + 2 * tig + kNib[nib][1];
            word |= code(col, kk) << (4 * nib);
          }
          qw[static_cast<size_t>(((t * d.ksteps + s) * 32 + l) * 4 + p)] = word;
        }
      }
    }
  }
  // Scales and zeros: half2 {scale, 1024 + zero}.
  std::vector<uint32_t> sz(static_cast<size_t>(d.ntiles * ng * kTileN), 0);
  for (int64_t t = 0; t < d.ntiles; ++t) {
    for (int64_t g = 0; g < ng; ++g) {
      for (int slot = 0; slot < kTileN; ++slot) {
        const int64_t col = t * kTileN + (slot % 8) * 8 + slot / 8;
        uint32_t v = 0;
        if (col < f.n) {
          const size_t i = static_cast<size_t>(col * ng + g);
          v = static_cast<uint32_t>(w.scales[i]) |
              (static_cast<uint32_t>(FloatToHalf(1024.f + w.zeros[i])) << 16);
        }
        sz[static_cast<size_t>((t * ng + g) * kTileN + slot)] = v;
      }
    }
  }
  if (absl::Status s = Upload(qw, &d.qw); !s.ok()) return s;
  if (absl::Status s = Upload(sz, &d.sz); !s.ok()) return s;
  if (absl::Status s = Upload(w.act_scale, &d.act_scale); !s.ok()) return s;
  out->qw_bytes_ = qw.size() * 4;
  out->sz_bytes_ = sz.size() * 4;
  out->extra_bytes_ = w.act_scale.size() * 4;

  if (ec != nullptr) {
    d.r = ec->rank;
    d.rp = RoundUp(d.r, 16);
    d.h = ec->gated ? ec->gate_hidden : 0;
    d.gated = ec->gated;
    out->rank_ = d.r;
    EcI8Factors enc;
    const EcI8Factors* f8 = I8Factors(*given, *ec, &enc);
    auto lay = BLayout(f8, *ec);
    if (!lay.ok()) return lay.status();
    std::vector<uint16_t> ascales;
    size_t a_bytes = 0;
    if (AInt8(f8, *ec, &ascales, &d.ec_ang)) {
      if (absl::Status s = Upload(f8->a, &d.ec_a8); !s.ok()) return s;
      if (absl::Status s = Upload(ascales, &d.ec_ascales); !s.ok()) return s;
      a_bytes = f8->a.size() + ascales.size() * 2;
    } else {
      const std::vector<uint16_t> a16 = ToHalf(ec->a);
      if (absl::Status s = Upload(a16, &d.ec_a); !s.ok()) return s;
      a_bytes = a16.size() * 2;
    }
    if (absl::Status s = Upload(lay->words, &d.ec_rec); !s.ok()) return s;
    if (absl::Status s = Upload(lay->scales, &d.ec_bscales); !s.ok()) return s;
    d.ec_rec_words = lay->words.size();
    d.ec_bscale_count = lay->scales.size();
    SetTileArgs(*lay, &d);
    if (ec->gated) {
      for (auto [src, dst] : {std::pair{&ec->w1, &d.w1}, std::pair{&ec->b1, &d.b1},
                              std::pair{&ec->w2, &d.w2}, std::pair{&ec->b2, &d.b2}}) {
        if (absl::Status s = Upload(*src, dst); !s.ok()) return s;
      }
    }
    out->ec_bytes_ = a_bytes + lay->bytes() +
                     4 * (ec->w1.size() + ec->b1.size() + ec->w2.size() + ec->b2.size());
  }
  return out;
}

absl::StatusOr<std::unique_ptr<W4DeviceWeight>> W4DeviceWeight::Clone() const {
  auto out = std::unique_ptr<W4DeviceWeight>(new W4DeviceWeight());
  out->fmt_ = fmt_;
  out->rank_ = rank_;
  out->qw_bytes_ = qw_bytes_;
  out->sz_bytes_ = sz_bytes_;
  out->ec_bytes_ = ec_bytes_;
  out->extra_bytes_ = extra_bytes_;
  for (int m = 0; m <= kMaxTunedM; ++m) out->tuning_[m] = tuning_[m];
  for (int b = 0; b < kPrefillBuckets; ++b) out->prefill_tuning_[b] = prefill_tuning_[b];
  Impl& o = *out->impl_;
  const Impl& d = *impl_;
  o = d;
  o.qw = nullptr;
  o.sz = nullptr;
  o.act_scale = nullptr;
  o.ec_a = nullptr;
  o.ec_a8 = nullptr;
  o.ec_ascales = nullptr;
  o.ec_rec = nullptr;
  o.ec_bscales = nullptr;
  o.w1 = o.b1 = o.w2 = o.b2 = nullptr;
  auto copy = [](auto* src, auto** dst, size_t bytes) -> absl::Status {
    if (src == nullptr) return absl::OkStatus();
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(dst), bytes));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpy(*dst, src, bytes, cudaMemcpyDeviceToDevice));
    return absl::OkStatus();
  };
  for (absl::Status s :
       {copy(d.qw, &o.qw, qw_bytes_), copy(d.sz, &o.sz, sz_bytes_),
        copy(d.act_scale, &o.act_scale, static_cast<size_t>(d.k) * 4),
        copy(d.ec_a, &o.ec_a, static_cast<size_t>(d.r * d.k) * 2),
        copy(d.ec_a8, &o.ec_a8, static_cast<size_t>(d.r * d.k)),
        copy(d.ec_ascales, &o.ec_ascales, static_cast<size_t>(d.r * d.ec_ang) * 2),
        copy(d.ec_rec, &o.ec_rec, d.ec_rec_words * 4),
        copy(d.ec_bscales, &o.ec_bscales, d.ec_bscale_count * 2),
        copy(d.w1, &o.w1, static_cast<size_t>(d.h * d.r) * 4),
        copy(d.b1, &o.b1, static_cast<size_t>(d.h) * 4),
        copy(d.w2, &o.w2, static_cast<size_t>(d.r * d.h) * 4),
        copy(d.b2, &o.b2, static_cast<size_t>(d.r) * 4)}) {
    if (!s.ok()) return s;
  }
  o.ecb.rec = o.ec_rec;
  o.ecb.scales = o.ec_bscales;
  return out;
}

// ---- workspace -------------------------------------------------------------

W4Workspace::W4Workspace() : impl_(std::make_unique<Impl>()) {}

W4Workspace::~W4Workspace() {
  Impl& d = *impl_;
  for (void* p : {static_cast<void*>(d.partials), static_cast<void*>(d.counters),
                  static_cast<void*>(d.ec_counter), static_cast<void*>(d.u),
                  static_cast<void*>(d.v), static_cast<void*>(d.xs), static_cast<void*>(d.wh),
                  static_cast<void*>(d.pxs), static_cast<void*>(d.pu),
                  static_cast<void*>(d.pv), static_cast<void*>(d.eb), static_cast<void*>(d.ea)}) {
    if (p != nullptr) cudaFree(p);
  }
  if (d.cublas != nullptr) blas::Destroy(d.cublas);
  if (d.cublas_ec != nullptr) blas::Destroy(d.cublas_ec);
  if (d.ec_fork != nullptr) cudaEventDestroy(d.ec_fork);
  if (d.ec_join != nullptr) cudaEventDestroy(d.ec_join);
  if (d.ec_stream != nullptr) cudaStreamDestroy(d.ec_stream);
}

absl::StatusOr<std::unique_ptr<W4Workspace>> W4Workspace::Create() {
  auto ws = std::unique_ptr<W4Workspace>(new W4Workspace());
  Impl& d = *ws->impl_;
  d.num_sms = NumSms();
  // Two partial slots per block, each at most 4 warps x 4 m16 tiles x 8
  // subtiles x 32 lanes x 4 floats.
  d.partial_floats = static_cast<size_t>(d.num_sms) * 2 * 4 * 4 * 1024;
  d.ncounters = int64_t{1} << 18;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.partials, d.partial_floats * 4));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.counters, d.ncounters * sizeof(int)));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemset(d.counters, 0, d.ncounters * sizeof(int)));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.ec_counter, sizeof(unsigned)));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemset(d.ec_counter, 0, sizeof(unsigned)));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.u, size_t{kEcMaxKParts} * kDecodeMaxM * kMaxRank * 4));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.v, kDecodeMaxM * kMaxRank * 2));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemset(d.v, 0, kDecodeMaxM * kMaxRank * 2));
  if (blas::Create(&d.cublas) != CUBLAS_STATUS_SUCCESS ||
      blas::Create(&d.cublas_ec) != CUBLAS_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("cublasCreate failed", blas::LoadError().empty() ? "" : ": ", blas::LoadError()));
  }
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&d.ec_stream, cudaStreamNonBlocking));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&d.ec_fork, cudaEventDisableTiming));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&d.ec_join, cudaEventDisableTiming));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return ws;
}

namespace {
template <typename T>
absl::Status Grow(T** p, size_t* have, size_t want) {
  if (*have >= want) return absl::OkStatus();
  if (*p != nullptr) {
    SPEAR_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    SPEAR_CUDA_RETURN_IF_ERROR(cudaFree(*p));
    *p = nullptr;
  }
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(p), want * sizeof(T)));
  *have = want;
  return absl::OkStatus();
}
}  // namespace

absl::Status W4Workspace::Reserve(const W4DeviceWeight& w, int64_t m) {
  const auto& d = w.impl();
  Impl& s = *impl_;
  const size_t mm = static_cast<size_t>(m);
  // The fp16 scratch: the dequantized weight, or the wgmma kernels' split
  // partials (the stream-K kernel's slots for a prefill's m at least).
  size_t wh = static_cast<size_t>(d.n * d.kp);
  if (m >= kPrefillM && PrefillWgmmaAvailable()) wh = std::max(wh, SkPartialHalves(s.num_sms));
  // v44: the small token tiles' k splits at decode-sized m (<= 4 splits of
  // m x n fp32 partials) where k is short.
  if (m > 0 && m < kPrefillM) wh = std::max(wh, 8 * mm * static_cast<size_t>(d.n));
  if (absl::Status st = Grow(&s.wh, &s.wh_elems, wh); !st.ok()) return st;
  if (absl::Status st = Grow(&s.pxs, &s.pxs_elems, mm * static_cast<size_t>(d.kp)); !st.ok()) {
    return st;
  }
  // An EC's B unpacked for the prefill / small-tile paths' y += V B^T.
  if (d.r > 0 && m > 0) {
    if (absl::Status st = Grow(&s.eb, &s.eb_elems, static_cast<size_t>(d.n * d.r)); !st.ok()) {
      return st;
    }
    if (d.ec_a8 != nullptr) {
      if (absl::Status st = Grow(&s.ea, &s.ea_elems, static_cast<size_t>(d.r * d.k)); !st.ok()) {
        return st;
      }
    }
  }
  size_t have_u = s.pu_elems;
  if (absl::Status st = Grow(&s.pu, &s.pu_elems, mm * kMaxRank); !st.ok()) return st;
  if (absl::Status st = Grow(&s.pv, &have_u, mm * kMaxRank); !st.ok()) return st;
  // x / act_scale for the decode path, 64 rows.
  size_t have_xs = static_cast<size_t>(s.xs_elems);
  if (absl::Status st = Grow(&s.xs, &have_xs, static_cast<size_t>(kDecodeMaxM * d.kp));
      !st.ok()) {
    return st;
  }
  s.xs_elems = static_cast<int64_t>(have_xs);
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
