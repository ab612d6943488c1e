#include "worker/engine/perplexity.h"

#include <algorithm>
#include <cmath>
#include <span>

#include "absl/strings/str_cat.h"
#include "kernels/ops.h"

namespace spear::engine {
namespace {

// -log softmax(row)[target] of the chunk's rows [0, rows) is lse[i] -
// row(i)[target]: the normalizers by the SIMD op (cpu::LogSumExp: exp in
// float, summed in double; ~1e-7 from the double-exp reference), the
// rows spread over the backend's host threads. (It was a serial double
// exp per logit: docs/results/foundation.md, "spear eval".)
absl::Status RowLogSumExp(const ForwardOutput& out, int64_t rows, int64_t vocab,
                          kernels::ThreadPool* pool, std::vector<double>* lse) {
  lse->resize(static_cast<size_t>(rows));
  kernels::LogSumExpParams p;
  p.x = out.row(0);
  p.y = lse->data();
  p.m = rows;
  p.n = vocab;
  p.ldx = out.vocab;  // (out.row's stride)
  return kernels::cpu::LogSumExp(p, pool);
}

}  // namespace

absl::StatusOr<PerplexityResult> EvalPerplexity(ModelRunner& runner,
                                                const std::vector<int32_t>& tokens, int ctx,
                                                int64_t max_tokens,
                                                const PerplexityProgress& progress,
                                                int64_t chunk_tokens) {
  CpuBackend backend(&runner);
  return EvalPerplexity(backend, tokens, ctx, max_tokens, progress, chunk_tokens);
}

absl::StatusOr<PerplexityResult> EvalPerplexity(ModelBackend& runner,
                                                const std::vector<int32_t>& tokens, int ctx,
                                                int64_t max_tokens,
                                                const PerplexityProgress& progress,
                                                int64_t chunk_tokens) {
  if (ctx < 2) return absl::InvalidArgumentError("perplexity: ctx must be >= 2");
  if (chunk_tokens <= 0) return absl::InvalidArgumentError("perplexity: chunk_tokens must be > 0");
  const int64_t avail = max_tokens > 0 ? std::min<int64_t>(max_tokens, tokens.size())
                                       : static_cast<int64_t>(tokens.size());
  const int64_t windows = avail / ctx;
  if (windows == 0) {
    return absl::InvalidArgumentError(absl::StrCat("perplexity: ", avail,
                                                   " tokens do not fill one window of ", ctx));
  }
  const int64_t vocab = runner.model().config.vocab_size;
  for (int64_t i = 0; i < windows * ctx; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("perplexity: token id ", tokens[i],
                                                     " at ", i, " outside the vocabulary"));
    }
  }
  std::vector<int32_t> table;
  if (auto s = runner.allocator().Allocate(runner.BlocksFor(ctx), &table); !s.ok()) return s;

  PerplexityResult r;
  ForwardOutput out;
  std::vector<double> lse;
  std::vector<SeqChunk> batch(1);
  absl::Status status;
  for (int64_t w = 0; w < windows && status.ok(); ++w) {
    const std::span<const int32_t> win(tokens.data() + w * ctx, ctx);
    for (int64_t start = 0; start < ctx; start += chunk_tokens) {
      const int64_t n = std::min<int64_t>(chunk_tokens, ctx - start);
      batch[0].tokens = win.subspan(start, n);
      batch[0].start_pos = start;
      batch[0].block_table = table;
      batch[0].logits = LogitsMode::kAll;
      status = runner.Forward(batch, &out);
      if (!status.ok()) break;
      // Row i predicts window token start + i + 1.
      const int64_t scored = std::min<int64_t>(n, ctx - 1 - start);
      if (scored <= 0) continue;
      status = RowLogSumExp(out, scored, vocab, runner.host_pool(), &lse);
      if (!status.ok()) break;
      for (int64_t i = 0; i < scored; ++i) {
        r.nll_sum += lse[i] - static_cast<double>(out.row(i)[win[start + i + 1]]);
        ++r.tokens_scored;
      }
    }
    ++r.windows;
    if (status.ok() && progress) {
      progress(r.windows, windows, std::exp(r.nll_sum / r.tokens_scored));
    }
  }
  (void)runner.allocator().Free(table);
  if (!status.ok()) return status;
  r.ppl = std::exp(r.nll_sum / static_cast<double>(r.tokens_scored));
  return r;
}

}  // namespace spear::engine
