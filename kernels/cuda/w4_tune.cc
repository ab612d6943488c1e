// TuneDecode (v23): the fold kernel's launch configuration measured per
// weight shape and m, instead of the cost model's guess (ChooseFold in
// w4_gemv_fold.cu). docs/results/gpu.md, "v22" and "v23", for why: at
// m = 2..8 the cost model missed the best configuration of 8B gate_up by
// up to 17 %, and the landscape (residency cliffs of shared memory and
// registers, ring depth) is too jagged for a closed-form model.
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/w4_layout.h"
#include "kernels/cuda_ops.h"
#include "kernels/w4_cuda.h"

namespace spear::kernels::cuda {
namespace {

// A configuration must beat the cost model's pick by this factor to be
// recorded: the timing noise between runs is a few percent (gpu.md), and a
// near-tie would otherwise flip from one load to the next.
constexpr double kMargin = 0.95;
constexpr int kRounds = 3;
// TuneDecode's confirmation of its pick: alternating timings per side.
constexpr int kConfirm = 5;
// TunePrefill's warm-up before its rounds (see there).
constexpr float kWarmMs = 20.f;

// The tuners' scratch: x [m][k] and y [m][n] fp16 for up to max_m rows of
// the weights' format, and two timing events.
struct Buffers {
  uint16_t* x = nullptr;
  uint16_t* y = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  size_t xe = 0;  // x's elements
  absl::Status Init(const W4Format& f, int64_t max_m) {
    xe = static_cast<size_t>(max_m) * f.k;
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&x, xe * 2));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&y, static_cast<size_t>(max_m) * f.n * 2));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e0));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e1));
    return absl::OkStatus();
  }
  // W4Linear's parameters for m rows of x into fp16 y, no EC (the tuner
  // adds the path and kernel choices).
  W4CudaParams Params(const W4Format& f, int64_t m) const {
    W4CudaParams p;
    p.x = x;
    p.m = m;
    p.ldx = f.k;
    p.y_f16 = y;
    p.ldy = f.n;
    p.use_ec = false;
    return p;
  }
  ~Buffers() {
    cudaFree(x);
    cudaFree(y);
    if (e0 != nullptr) cudaEventDestroy(e0);
    if (e1 != nullptr) cudaEventDestroy(e1);
  }
};

// The arguments both tuners share: weights of one shape, a workspace, a
// stream not being captured.
absl::Status CheckTuneArgs(const char* name, const std::vector<W4DeviceWeight*>& weights,
                           const W4Workspace* ws, cudaStream_t stream) {
  if (weights.empty() || ws == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": no weights or no workspace"));
  }
  for (const W4DeviceWeight* w : weights) {
    if (w == nullptr) return absl::InvalidArgumentError(absl::StrCat(name, ": a null weight"));
  }
  const W4Format& f = weights[0]->fmt();
  for (const W4DeviceWeight* w : weights) {
    const W4Format& g = w->fmt();
    if (!(g == f)) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": weights of different shapes (", f.n, "x", f.k, " g", f.group_size, " vs ",
          g.n, "x", g.k, " g", g.group_size, ")"));
    }
  }
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &cap));
  if (cap != cudaStreamCaptureStatusNone) {
    return absl::FailedPreconditionError(absl::StrCat(name, ": the stream is being captured"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status TuneDecode(const std::vector<W4DeviceWeight*>& weights, int max_m, W4Workspace* ws,
                        cudaStream_t stream) {
  if (max_m < 1 || max_m > W4DeviceWeight::kMaxTunedM) {
    return absl::InvalidArgumentError(
        absl::StrCat("TuneDecode: max_m ", max_m, " outside 1..", W4DeviceWeight::kMaxTunedM));
  }
  if (absl::Status st = CheckTuneArgs("TuneDecode", weights, ws, stream); !st.ok()) return st;
  const W4Format& f = weights[0]->fmt();
  Buffers b;
  if (absl::Status st = b.Init(f, max_m); !st.ok()) return st;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.x, 0, b.xe * 2, stream));
  // Launches per timing: every weight at least twice, at least 16 in all.
  const int nw = static_cast<int>(weights.size());
  const int launches = std::max(16, 2 * nw);

  for (int m = 1; m <= max_m; ++m) {
    W4CudaParams p = b.Params(f, m);
    p.force_decode = true;
    // Per microsecond of one launch, the best of kRounds; -1: refused.
    auto time = [&](int dk, int splits, int depth, double* us) -> absl::Status {
      p.decode_kernel = dk;
      p.decode_splits = splits;
      p.decode_depth = depth;
      const absl::Status first = W4Linear(*weights[0], p, ws, stream);  // warm-up; refusals
      if (absl::IsInvalidArgument(first)) {
        *us = -1;
        return absl::OkStatus();
      }
      if (!first.ok()) return first;
      double best = 1e30;
      for (int r = 0; r < kRounds; ++r) {
        SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.e0, stream));
        for (int i = 0; i < launches; ++i) {
          if (absl::Status st = W4Linear(*weights[i % nw], p, ws, stream); !st.ok()) return st;
        }
        SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.e1, stream));
        SPEAR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(b.e1));
        float ms = 0;
        SPEAR_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, b.e0, b.e1));
        best = std::min(best, 1e3 * ms / launches);
      }
      *us = best;
      return absl::OkStatus();
    };
    // The baseline is the cost model's pick: no earlier tuning for m (the
    // forced candidates below do not consult it).
    for (W4DeviceWeight* w : weights) w->set_decode_tuning(m, {});
    double base = 0;
    if (absl::Status st = time(0, 0, 0, &base); !st.ok()) return st;
    W4DeviceWeight::DecodeTuning pick;
    int pick_flags = 0;
    double pick_us = base * kMargin;
    // v41: 8 warps also in 2, 4 and 8 groups (each group on its own tile;
    // gpu.md "v41": 8B gate_up at m = 1 / 8 19.6-19.7 / 22.4 us grouped
    // against 20.9 / 26.6 for the best one-group configuration).
    static constexpr struct {
      int warps, groups, flags;
    } kForms[] = {{8, 1, 5}, {4, 1, 4}, {8, 2, 5 | 256}, {8, 4, 5 | 512}, {8, 8, 5 | 768}};
    for (const auto& form : kForms) {
      // v56: at one row no warp groups. Measured alone (eagerly or in a
      // graph) 8B gate_up's grouped forms beat the cost model's pick by
      // >= 5 % (H100 graph sweep: 24.1 against 25.5 us), yet inside the
      // decode step that pick made the step slower:
      // 8B batch 1 +0.11 ms on the H100 (8 warps, 1 split, depth 4, 2
      // groups), +0.13-0.18 ms on the H200 (2 or 8 groups), with the
      // layers' RMSNorm inside the calls or apart alike; the ungrouped picks
      // at one row (1B o and down) made the step faster (docs/results/gpu.md,
      // "v56").
      if (m == 1 && form.groups > 1) continue;
      for (int splits : {1, 2, 4, 8}) {
        for (int depth : {2, 3, 4}) {
          double us = 0;
          if (absl::Status st = time(form.flags, splits, depth, &us); !st.ok()) return st;
          if (us > 0 && us < pick_us) {
            pick_us = us;
            pick = {form.warps, splits, depth, form.groups > 1 ? form.groups : 0};
            pick_flags = form.flags;
          }
        }
      }
    }
    // v56: the fastest of ~60 noisy timings is biased low (it is the
    // minimum), so the pick is timed again against the baseline, kConfirm
    // times each in alternation, and kept only if its median still beats
    // the baseline's by kMargin. Without this, 8B o at one row took
    // 4 warps / 4 splits / depth 4 on one load and nothing on the next, and
    // the step with it was 0.037 ms slower (gpu.md, "v56").
    if (pick.warps != 0) {
      double tb[kConfirm], tp[kConfirm];
      for (int r = 0; r < kConfirm; ++r) {
        if (absl::Status st = time(0, 0, 0, &tb[r]); !st.ok()) return st;
        if (absl::Status st = time(pick_flags, pick.splits, pick.depth, &tp[r]); !st.ok()) {
          return st;
        }
      }
      std::sort(tb, tb + kConfirm);
      std::sort(tp, tp + kConfirm);
      if (!(tp[kConfirm / 2] > 0 && tp[kConfirm / 2] < tb[kConfirm / 2] * kMargin)) pick = {};
    }
    for (W4DeviceWeight* w : weights) w->set_decode_tuning(m, pick);
  }
  return absl::OkStatus();
}

absl::Status TunePrefill(const std::vector<W4DeviceWeight*>& weights, int64_t max_m,
                         W4Workspace* ws, cudaStream_t stream,
                         std::vector<PrefillTuneRow>* report) {
  if (max_m < kPrefillM || max_m > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("TunePrefill: max_m ", max_m, " outside ", kPrefillM, "..65536"));
  }
  if (absl::Status st = CheckTuneArgs("TunePrefill", weights, ws, stream); !st.ok()) return st;
  for (W4DeviceWeight* w : weights) {
    for (int bk = 0; bk < W4DeviceWeight::kPrefillBuckets; ++bk) w->set_prefill_tuning(bk, {});
  }
  if (!PrefillWgmmaAvailable()) return absl::OkStatus();  // dequantize + cuBLAS only
  const W4Format& f = weights[0]->fmt();
  if (f.k % 8 != 0) return absl::OkStatus();  // the wgmma kernels need k % 8 == 0
  // Every weight (one shape, but their EC ranks differ, and with them the
  // workspace's unpacked-EC buffers): nothing may grow inside a capture.
  for (W4DeviceWeight* w : weights) {
    if (absl::Status st = ws->Reserve(*w, max_m); !st.ok()) return st;
  }
  Buffers b;
  if (absl::Status st = b.Init(f, max_m); !st.ok()) return st;
  // x of activation-like values (N(0, 1) fp16, every element its own: a
  // GEMM of zeros draws less power, and so does one of a short block
  // repeated, which TunePrefill's first form used: v36 call 6 measured
  // dequantize + cuBLAS on 8B gate_up at m = 2048 at 737 us on it against
  // 825-852 in the bench on fully random x, the WS kernel 756 / 713).
  if (absl::Status st = LaunchFillNormal(b.x, b.xe, 12345u, stream); !st.ok()) return st;
  // Timing in a CUDA graph on a stream of our own (as a captured or
  // queued-ahead forward runs it): launched eagerly, the dequantizing
  // path's two launches per call (~10 us of host time) would be timed
  // instead of the GPU at small m.
  cudaStream_t ts = nullptr;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ts, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{ts};
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  // Launches per timing: every weight once, at least 8 (a prefill launch
  // runs for 10 us or more).
  const int nw = static_cast<int>(weights.size());
  const int launches = std::max(8, nw);
  // Timed: the baseline (index 0) and kPrefillCandidates (1 ..).
  const auto cand = [](int c) -> std::pair<int, int> {
    if (c == 0) return {1, 0};
    return {kPrefillCandidates[c - 1][0], kPrefillCandidates[c - 1][1]};
  };
  for (int bk = 0; bk < W4DeviceWeight::kPrefillBuckets; ++bk) {
    const int64_t m = int64_t{64} << bk;
    if (m > max_m) break;
    W4CudaParams p = b.Params(f, m);
    p.force_prefill = true;
    // One graph of `launches` calls per candidate (index 0: dequantize +
    // cuBLAS, the baseline), null where the candidate is refused; then
    // kRounds rounds that replay every graph once in turn, so that a
    // drift of the GPU's clocks (power, temperature) between candidates
    // falls on all of them alike; microseconds per launch, the median round.
    struct Exec {
      cudaGraphExec_t e = nullptr;
      ~Exec() {
        if (e != nullptr) cudaGraphExecDestroy(e);
      }
    };
    constexpr int kNc = 1 + kNumPrefillCandidates;
    Exec execs[kNc];
    auto build = [&](int kernel, int splits, Exec* out) -> absl::Status {
      p.prefill_kernel = kernel;
      p.prefill_splits = splits;
      const absl::Status first = W4Linear(*weights[0], p, ws, ts);  // warm-up; refusals
      if (absl::IsInvalidArgument(first)) return absl::OkStatus();
      if (!first.ok()) return first;
      SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ts));
      absl::StatusOr<cudaGraphExec_t> e = CaptureGraph(ts, [&]() -> absl::Status {
        for (int i = 0; i < launches; ++i) {
          if (absl::Status s = W4Linear(*weights[i % nw], p, ws, ts); !s.ok()) return s;
        }
        return absl::OkStatus();
      });
      if (!e.ok()) return e.status();
      out->e = *e;
      SPEAR_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(out->e, ts));  // warm
      return absl::OkStatus();
    };
    for (int c = 0; c < kNc; ++c) {
      if (absl::Status st = build(cand(c).first, cand(c).second, &execs[c]); !st.ok()) return st;
    }
    if (execs[0].e == nullptr) {
      return absl::InternalError("TunePrefill: dequantize + cuBLAS refused the tuning call");
    }
    // One replay of candidate c's graph, in milliseconds.
    auto replay_ms = [&](int c, float* ms) -> absl::Status {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.e0, ts));
      SPEAR_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(execs[c].e, ts));
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.e1, ts));
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(b.e1));
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(ms, b.e0, b.e1));
      return absl::OkStatus();
    };
    // v36: first the baseline's graph for >= kWarmMs, so that the rounds
    // run in the clock / power state of a sustained prefill (v36 call 5:
    // at m = 2048 the rounds measured dequantize + cuBLAS at 721 us for 8B
    // gate_up where a sustained run took 837-876, the warp-specialized
    // kernel at 731 against 714); then kRounds rounds, each starting at
    // another candidate; per candidate the median round.
    {
      float ms = 0;
      if (absl::Status st = replay_ms(0, &ms); !st.ok()) return st;
      const int reps = std::min(1000, static_cast<int>(kWarmMs / std::max(ms, 1e-3f)) + 1);
      for (int i = 0; i < reps; ++i) SPEAR_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(execs[0].e, ts));
    }
    double rounds[kNc][kRounds];
    for (int r = 0; r < kRounds; ++r) {
      for (int i = 0; i < kNc; ++i) {
        const int c = (i + r * (kNc / kRounds + 1)) % kNc;
        rounds[c][r] = 1e30;
        if (execs[c].e == nullptr) continue;
        float ms = 0;
        if (absl::Status st = replay_ms(c, &ms); !st.ok()) return st;
        rounds[c][r] = 1e3 * ms / launches;
      }
    }
    double us[kNc];
    for (int c = 0; c < kNc; ++c) {
      std::sort(rounds[c], rounds[c] + kRounds);
      us[c] = rounds[c][kRounds / 2];
    }
    if (report != nullptr) {
      for (int c = 0; c < kNc; ++c) {
        const double u = execs[c].e != nullptr ? us[c] : std::numeric_limits<double>::infinity();
        report->push_back({m, cand(c).first, cand(c).second, u});
      }
    }
    W4DeviceWeight::PrefillTuning pick;
    double pick_us = us[0] * kMargin;
    for (int c = 1; c < kNc; ++c) {
      if (execs[c].e != nullptr && us[c] < pick_us) {
        pick_us = us[c];
        pick = {cand(c).first, cand(c).second};
      }
    }
    for (W4DeviceWeight* w : weights) w->set_prefill_tuning(bk, pick);
  }
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
