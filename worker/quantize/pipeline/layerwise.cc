#include "worker/quantize/pipeline/layerwise.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace spear::quantize {

absl::StatusOr<std::unique_ptr<LayerwiseRunner>> LayerwiseRunner::Create(
    const model::LoadedModel* model, kernels::ThreadPool* pool,
    std::vector<std::vector<int32_t>> sequences, int64_t micro_batch_tokens) {
  if (model == nullptr) return absl::InvalidArgumentError("LayerwiseRunner: null model");
  if (sequences.empty()) return absl::InvalidArgumentError("LayerwiseRunner: no sequences");
  std::unique_ptr<LayerwiseRunner> r(new LayerwiseRunner(model, pool));
  r->seqs_ = std::move(sequences);
  const int64_t vocab = model->config.vocab_size;
  r->seq_offsets_.assign(1, 0);
  for (const auto& s : r->seqs_) {
    if (s.empty()) return absl::InvalidArgumentError("LayerwiseRunner: empty sequence");
    for (int32_t t : s) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("LayerwiseRunner: token ", t,
                                                       " outside the vocabulary"));
      }
    }
    r->seq_offsets_.push_back(r->seq_offsets_.back() + static_cast<int64_t>(s.size()));
  }
  r->total_tokens_ = r->seq_offsets_.back();

  // Greedy packing of whole sequences into micro-batches.
  MicroBatch cur;
  for (size_t i = 0; i < r->seqs_.size(); ++i) {
    const int64_t n = static_cast<int64_t>(r->seqs_[i].size());
    if (!cur.chunks.empty() && cur.tokens + n > micro_batch_tokens) {
      r->batches_.push_back(std::move(cur));
      cur = MicroBatch{};
    }
    if (cur.chunks.empty()) cur.row0 = r->seq_offsets_[i];
    engine::SeqChunk ch;
    ch.tokens = r->seqs_[i];
    ch.start_pos = 0;
    ch.logits = engine::LogitsMode::kNone;
    cur.chunks.push_back(ch);
    cur.tokens += n;
  }
  r->batches_.push_back(std::move(cur));

  // KV blocks: slot j of every micro-batch uses block table j, long enough
  // for the longest sequence seen at that slot.
  const int block_size = 16;
  std::vector<int64_t> slot_len;
  for (const MicroBatch& b : r->batches_) {
    if (slot_len.size() < b.chunks.size()) slot_len.resize(b.chunks.size(), 0);
    for (size_t j = 0; j < b.chunks.size(); ++j) {
      slot_len[j] = std::max<int64_t>(slot_len[j], b.chunks[j].tokens.size());
    }
  }
  int64_t blocks = 0;
  for (int64_t len : slot_len) blocks += (len + block_size - 1) / block_size;
  engine::KvCacheOptions ko;
  ko.block_size = block_size;
  ko.num_blocks = blocks;
  auto cache = engine::KvCache::Create(model->config, ko);
  if (!cache.ok()) return cache.status();
  r->cache_ = std::move(*cache);
  r->block_tables_.resize(slot_len.size());
  for (size_t j = 0; j < slot_len.size(); ++j) {
    const int64_t need = r->cache_->BlocksFor(slot_len[j]);
    if (auto s = r->cache_->allocator().Allocate(need, &r->block_tables_[j]); !s.ok()) return s;
  }
  for (MicroBatch& b : r->batches_) {
    for (size_t j = 0; j < b.chunks.size(); ++j) b.chunks[j].block_table = r->block_tables_[j];
  }
  r->runner_ = std::make_unique<engine::ModelRunner>(model, r->cache_.get(), pool);
  return r;
}

absl::Status LayerwiseRunner::Embed(float* h) {
  const int64_t d = hidden();
  for (const MicroBatch& b : batches_) {
    if (auto s = runner_->Embed(b.chunks, h + b.row0 * d); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status LayerwiseRunner::RunLayers(int64_t first, int64_t last, float* h,
                                        const StreamObserver& observer) {
  const int64_t d = hidden();
  for (const MicroBatch& b : batches_) {
    engine::LinearObserver obs;
    if (observer) {
      obs = [&](int64_t layer, LayerModule m, const float* x, int64_t rows, int64_t ldx) {
        return observer(layer, m, x, b.row0, rows, ldx);
      };
    }
    if (auto s = runner_->RunLayers(b.chunks, first, last, h + b.row0 * d, obs); !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status LayerwiseRunner::FinalNorm(const float* h, float* y) {
  return runner_->FinalNorm(h, total_tokens_, y);
}

}  // namespace spear::quantize
