// Why CudaModelRunner.TinyPerChannelGatedEcMatchesCpu's "decode 2" lands
// 0.081 std from the CPU where its other forwards stay within 0.007
// (docs/results/gpu.md, part 3): the same scenario (model, seeds,
// batches, greedy tokens) on the CPU, fp32 against the CPU with the CUDA
// runner's fp16 storage emulated (tests/engine/fp16_emulation.h). Found: that forward is ill-conditioned,
// not mis-computed. fp16 storage alone moves it 7-16x more than any
// other forward (the CPU emulation, no GPU involved); the growth is in
// layer 2's attention for sequence 2, whose softmax is not saturated there
// (top probabilities 0.17-0.59 over 43 keys) where at the other steps it
// is (>= 0.93 on one key), so rounding-sized score changes move its output.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/ops.h"
#include "tests/engine/fp16_emulation.h"
#include "tests/engine/tiny_w4_model.h"
#include "worker/engine/model_runner.h"

namespace spear::engine {
namespace {

double RelMaxDiff(const ForwardOutput& a, const ForwardOutput& b) {
  const int64_t n = a.num_rows * a.vocab;
  double s = 0, s2 = 0, md = 0;
  for (int64_t i = 0; i < n; ++i) {
    s += a.logits[i];
    s2 += static_cast<double>(a.logits[i]) * a.logits[i];
    md = std::max(md, std::fabs(static_cast<double>(a.logits[i]) - b.logits[i]));
  }
  const double mean = s / n;
  return md / std::sqrt(std::max(1e-30, s2 / n - mean * mean));
}

// The scenario of cuda_runner_test.cc's RunScenario (prefill; the last
// sequence's tail chunk with decode tokens; `steps` decode steps fed with
// the fp32 greedy tokens). Returns max|diff|/std per forward, in order.
// With only_forward >= 0 the emulation rounds only in that forward (the
// earlier ones run in fp32: same cache contents as the reference).
std::vector<double> Scenario(const model::LoadedModel* m, const std::vector<int64_t>& lens,
                             int steps, uint32_t seed, testing::Fp16Points points,
                             int only_forward = -1,
                             std::vector<std::vector<float>>* trace = nullptr,
                             const std::function<void(const KvCache& ref_cache,
                                                      const std::vector<std::vector<int32_t>>& tables,
                                                      const std::vector<int64_t>& positions)>&
                                 after = nullptr) {
  const int64_t per_seq = 16, nseq = static_cast<int64_t>(lens.size());
  KvCacheOptions ko;
  ko.block_size = 16;
  ko.num_blocks = per_seq * nseq + 3;
  auto ref_cache = std::move(*KvCache::Create(m->config, ko));
  auto emu_cache = std::move(*KvCache::Create(m->config, ko));
  kernels::ThreadPool pool(2);
  ModelRunner ref(m, ref_cache.get(), &pool);
  testing::Fp16EmulatingRunner emu(m, emu_cache.get(), &pool, points);
  std::mt19937 rng(seed);
  std::vector<int32_t> perm(per_seq * nseq);
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int32_t>(i + 3);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::vector<int32_t>> tables(nseq), toks(nseq);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(m->config.vocab_size - 1));
  for (int64_t s = 0; s < nseq; ++s) {
    tables[s].assign(perm.begin() + s * per_seq, perm.begin() + (s + 1) * per_seq);
    for (int64_t i = 0; i < lens[s]; ++i) toks[s].push_back(tok(rng));
  }
  std::vector<int64_t> done(nseq, 0);
  auto chunk = [&](int64_t s, int64_t from, int64_t n, LogitsMode mode) {
    SeqChunk c;
    c.tokens = std::span<const int32_t>(toks[s].data() + from, n);
    c.start_pos = from;
    c.block_table = tables[s];
    c.logits = mode;
    return c;
  };
  std::vector<double> rel;
  // Runs both; returns the fp32 greedy token of each sequence's last row.
  const testing::Fp16Points none{false, false, false};
  auto step = [&](const std::vector<SeqChunk>& b) {
    if (only_forward >= 0) {
      const bool here = static_cast<int>(rel.size()) == only_forward;
      emu.set_points(here ? points : none);
      emu.set_trace(here ? trace : nullptr);
    }
    ForwardOutput r, e;
    EXPECT_TRUE(ref.Forward(b, &r).ok());
    EXPECT_TRUE(emu.Forward(b, &e).ok());
    EXPECT_EQ(r.num_rows, e.num_rows);
    if (after && static_cast<int>(rel.size()) == only_forward) {
      std::vector<int64_t> pos;  // the position of each sequence's last token
      for (const SeqChunk& c : b) pos.push_back(c.start_pos + static_cast<int64_t>(c.tokens.size()) - 1);
      after(*ref_cache, tables, pos);
    }
    rel.push_back(RelMaxDiff(r, e));
    std::vector<int32_t> last;
    int64_t row = 0;
    for (const SeqChunk& c : b) {
      row += c.logits == LogitsMode::kAll ? static_cast<int64_t>(c.tokens.size()) : 1;
      const float* x = r.row(row - 1);
      last.push_back(static_cast<int32_t>(std::max_element(x, x + r.vocab) - x));
    }
    return last;
  };
  std::vector<SeqChunk> b;
  const int64_t tail = std::min<int64_t>(9, lens.back() - 1);
  for (int64_t s = 0; s < nseq; ++s) {
    const int64_t n = s + 1 == nseq ? lens[s] - tail : lens[s];
    b.push_back(chunk(s, 0, n, s == 0 ? LogitsMode::kAll : LogitsMode::kLast));
    done[s] = n;
  }
  std::vector<int32_t> last = step(b);
  b.clear();
  for (int64_t s = 0; s < nseq; ++s) {
    if (s + 1 == nseq) {
      b.push_back(chunk(s, done[s], tail, LogitsMode::kLast));
      done[s] += tail;
    } else {
      toks[s].push_back(last[s]);
      b.push_back(chunk(s, done[s], 1, LogitsMode::kLast));
      done[s] += 1;
    }
  }
  last = step(b);
  for (int i = 0; i < steps; ++i) {
    b.clear();
    for (int64_t s = 0; s < nseq; ++s) {
      toks[s].push_back(last[s]);
      b.push_back(chunk(s, done[s], 1, LogitsMode::kLast));
      done[s] += 1;
    }
    last = step(b);
  }
  return rel;
}

TEST(Fp16Sensitivity, TinyPerChannelGatedEcScenario) {
  auto m = testing::TinyW4Model(/*grouped=*/false, /*tied=*/false);
  struct Variant {
    const char* name;
    testing::Fp16Points p;
  };
  const Variant variants[] = {{"all points", {true, true, true}},
                              {"linear inputs only", {true, false, false}},
                              {"KV cache only", {false, true, false}},
                              {"final norm only", {false, false, true}}};
  std::vector<double> all;
  for (const Variant& v : variants) {
    const std::vector<double> rel = Scenario(m.get(), {1, 17, 40}, 6, 21, v.p);
    if (all.empty()) all = rel;
    std::string line;
    for (double r : rel) absl::StrAppend(&line, " ", absl::SixDigits(r));
    std::printf("[%s] max|fp16 emu - fp32| / std per forward (prefill, chunk+decode, decode 0..5):%s\n",
                v.name, line.c_str());
  }
  // Forward 4 is "decode 2", the GPU test's failing step: fp16 storage moves
  // its logits about ten times more than it moves any other forward's.
  ASSERT_EQ(all.size(), 8u);
  std::vector<double> others(all);
  others.erase(others.begin() + 4);
  std::sort(others.begin(), others.end());
  EXPECT_GT(all[4], 5 * others.back()) << "decode 2 is no longer the ill-conditioned step";

  // Which rounding, in decode 2 alone (earlier forwards in fp32), moves it:
  // each linear input of each layer by itself; decode 1 for comparison.
  const char* inputs[] = {"q/k/v in", "o in", "gate/up in", "down in"};
  for (int fwd : {3, 4}) {
    for (int64_t l = 0; l < m->config.num_layers; ++l) {
      std::string line;
      for (int in = 0; in < 4; ++in) {
        testing::Fp16Points p{true, false, false, l, in};
        const std::vector<double> rel = Scenario(m.get(), {1, 17, 40}, 6, 21, p, fwd);
        absl::StrAppend(&line, "  ", inputs[in], " ", absl::SixDigits(rel[fwd]));
      }
      std::printf("[%s, only layer %lld]%s\n", fwd == 4 ? "decode 2" : "decode 1",
                  static_cast<long long>(l), line.c_str());
    }
  }
}

// How one rounding (layer 0's gate/up input, the largest single cause)
// travels through decode 2 and, for comparison, decode 1: the relative
// change ||x' - x|| / ||x|| of every later linear input, per sequence row.
// Where it jumps between two consecutive inputs is where the forward
// amplifies.
TEST(Fp16Sensitivity, WhereDecode2Amplifies) {
  auto m = testing::TinyW4Model(/*grouped=*/false, /*tied=*/false);
  const char* names[] = {"q/k/v in", "o in", "gate/up in", "down in"};
  std::vector<std::vector<double>> gain[2];  // [decode 1, decode 2][point][row]
  for (int fwd : {3, 4}) {
    std::vector<std::vector<float>> base, pert;
    Scenario(m.get(), {1, 17, 40}, 6, 21, testing::Fp16Points{false, false, false}, fwd, &base);
    Scenario(m.get(), {1, 17, 40}, 6, 21, testing::Fp16Points{true, false, false, 0, 2}, fwd,
             &pert);
    ASSERT_EQ(base.size(), pert.size());
    ASSERT_EQ(base.size(), 4u * m->config.num_layers);
    const int64_t rows = 3;
    for (size_t p = 0; p < base.size(); ++p) {
      const int64_t ld = static_cast<int64_t>(base[p].size()) / rows;
      std::string line;
      std::vector<double> rows_rel;
      for (int64_t r = 0; r < rows; ++r) {
        double d2 = 0, x2 = 0;
        for (int64_t j = 0; j < ld; ++j) {
          const double a = base[p][r * ld + j], b = pert[p][r * ld + j];
          d2 += (a - b) * (a - b);
          x2 += a * a;
        }
        rows_rel.push_back(std::sqrt(d2 / std::max(x2, 1e-30)));
        absl::StrAppend(&line, "  row ", r, " ", absl::SixDigits(rows_rel.back()));
      }
      std::printf("[%s] layer %zu %-10s%s\n", fwd == 4 ? "decode 2" : "decode 1", p / 4,
                  names[p % 4], line.c_str());
      gain[fwd - 3].push_back(rows_rel);
    }
  }
  // decode 2: sequence 2's perturbation grows > 4x through layer 2's
  // attention (its q/k/v input -> its output); decode 1: no attention of
  // any layer grows any row's perturbation 2x.
  EXPECT_GT(gain[1][2 * 4 + 1][2], 4 * gain[1][2 * 4 + 0][2]);
  for (int64_t l = 0; l < m->config.num_layers; ++l) {
    for (int r = 0; r < 3; ++r) {
      if (gain[0][l * 4 + 0][r] == 0) continue;  // layer 0: nothing rounded yet
      EXPECT_LT(gain[0][l * 4 + 1][r], 2 * gain[0][l * 4 + 0][r]) << "decode 1 layer " << l;
    }
  }
}

// The attention that amplifies: layer 2, sequence 2, at decode 2 (and at
// decode 1), per query head: the two largest softmax probabilities, the
// score gap between them and the range of scores (in the softmax's units),
// from the fp32 run.
TEST(Fp16Sensitivity, Decode2Layer2Attention) {
  auto m = testing::TinyW4Model(/*grouped=*/false, /*tied=*/false);
  const model::ModelConfig& c = m->config;
  const int64_t d = c.hidden_size, hd = c.head_dim, qd = c.num_heads * hd,
                kvd = c.num_kv_heads * hd;
  kernels::ThreadPool pool(1);
  const std::vector<float> inv_freq = c.RopeInvFreq();
  double min_top[2] = {1, 1}, max_top[2] = {0, 0};
  for (int fwd : {3, 4}) {
    std::vector<std::vector<float>> trace;
    Scenario(m.get(), {1, 17, 40}, 6, 21, testing::Fp16Points{false, false, false}, fwd, &trace,
             [&](const KvCache& cache, const std::vector<std::vector<int32_t>>& tables,
                 const std::vector<int64_t>& pos) {
               const int64_t layer = 2, seq = 2, p = pos[seq];
               // q of sequence 2's token: q_proj of its layer-2 input, RoPE'd.
               const std::vector<float>& x = trace[layer * 4 + 0];
               std::vector<float> q(qd);
               ASSERT_TRUE(m->weights.layers[layer].q_proj
                               ->Forward(x.data() + seq * d, 1, d, q.data(), qd, false, &pool)
                               .ok());
               const int32_t position = static_cast<int32_t>(p);
               kernels::RopeParams rp;
               rp.x = q.data();
               rp.m = 1;
               rp.ldx = qd;
               rp.n_heads = static_cast<int>(c.num_heads);
               rp.head_dim = static_cast<int>(hd);
               rp.positions = &position;
               rp.inv_freq = inv_freq.data();
               ASSERT_TRUE(kernels::ref::Rope(rp).ok());
               const float* kc = cache.k(layer);
               for (int64_t h = 0; h < c.num_heads; ++h) {
                 const int64_t kvh = h / (c.num_heads / c.num_kv_heads);
                 std::vector<double> s(p + 1);
                 for (int64_t j = 0; j <= p; ++j) {
                   const int64_t slot = tables[seq][j / cache.block_size()] * cache.block_size() +
                                        j % cache.block_size();
                   double dot = 0;
                   for (int64_t e = 0; e < hd; ++e) {
                     dot += static_cast<double>(q[h * hd + e]) * kc[slot * kvd + kvh * hd + e];
                   }
                   s[j] = dot / std::sqrt(static_cast<double>(hd));
                 }
                 std::vector<double> sorted(s);
                 std::sort(sorted.rbegin(), sorted.rend());
                 double z = 0;
                 for (double v : s) z += std::exp(v - sorted[0]);
                 const double p1 = 1 / z, p2 = std::exp(sorted[1] - sorted[0]) / z;
                 min_top[fwd - 3] = std::min(min_top[fwd - 3], p1);
                 max_top[fwd - 3] = std::max(max_top[fwd - 3], p1);
                 std::printf("[%s] layer 2 seq 2 head %lld: top probabilities %.3f %.3f, score gap "
                             "%.3f, score range %.1f over %lld keys\n",
                             fwd == 4 ? "decode 2" : "decode 1", static_cast<long long>(h), p1,
                             p2, sorted[0] - sorted[1], sorted[0] - sorted.back(),
                             static_cast<long long>(p + 1));
               }
             });
  }
  // decode 1: every head is saturated on one key (the softmax's gradient
  // p (1 - p) ~ 0: perturbed scores change nothing); decode 2: no head is,
  // the weight is shared by several keys, so score perturbations move the
  // output.
  std::printf("top attention probability over heads: decode 1 %.3f..%.3f, decode 2 %.3f..%.3f\n",
              min_top[0], max_top[0], min_top[1], max_top[1]);
  EXPECT_GT(min_top[0], 0.9);
  EXPECT_LT(max_top[1], 0.65);
}

}  // namespace
}  // namespace spear::engine
