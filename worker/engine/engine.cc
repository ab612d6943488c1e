#include "worker/engine/engine.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"

namespace spear::engine {

Engine::Engine(const model::LoadedModel* model, const EngineOptions& options)
    : model_(model), options_(options) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const model::LoadedModel* model,
                                                       const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: null model");
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError("Engine: max_batch_tokens must be positive");
  }
  std::unique_ptr<Engine> e(new Engine(model, options));
  e->pool_ = std::make_unique<kernels::ThreadPool>(options.num_threads);
  auto backend = CpuBackend::Create(model, options.kv_cache, e->pool_.get());
  if (!backend.ok()) return backend.status();
  e->backend_ = std::move(*backend);
  return e;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const model::LoadedModel* model,
                                                       const EngineOptions& options,
                                                       std::unique_ptr<ModelBackend> backend) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: null model");
  if (backend == nullptr) return absl::InvalidArgumentError("Engine: null backend");
  if (&backend->model() != model) {
    return absl::InvalidArgumentError("Engine: the backend runs another model");
  }
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError("Engine: max_batch_tokens must be positive");
  }
  std::unique_ptr<Engine> e(new Engine(model, options));
  e->pool_ = std::make_unique<kernels::ThreadPool>(options.num_threads);
  e->backend_ = std::move(backend);
  return e;
}

absl::StatusOr<std::unique_ptr<Sequence>> Engine::NewSequence(std::vector<int32_t> prompt,
                                                              const SamplingParams& sampling,
                                                              const GenerateOptions& options) {
  const model::ModelConfig& c = model_->config;
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  for (int32_t t : prompt) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", t, " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (auto s = sampling.Validate(); !s.ok()) return s;
  if (options.max_new_tokens < 0) {
    return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  if (c.max_position > 0 && total > c.max_position) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt.size(),
                                                   " tokens) + max_new_tokens (",
                                                   options.max_new_tokens,
                                                   ") exceeds the context length ",
                                                   c.max_position));
  }
  auto seq = std::make_unique<Sequence>(next_id_++, std::move(prompt), sampling, options);
  if (MaxBlocksNeeded(*seq) > backend_->num_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request needs up to ", MaxBlocksNeeded(*seq), " KV blocks, the cache has ",
        backend_->num_blocks()));
  }
  return seq;
}

int64_t Engine::MaxBlocksNeeded(const Sequence& seq) const {
  return backend_->BlocksFor(seq.num_prompt_tokens() + seq.options().max_new_tokens);
}

bool Engine::IsStopToken(const Sequence& seq, int32_t token) const {
  const auto& stop = seq.options().stop_token_ids;
  if (std::find(stop.begin(), stop.end(), token) != stop.end()) return true;
  if (!seq.options().stop_on_eos) return false;
  for (int64_t e : model_->config.eos_token_ids) {
    if (e == token) return true;
  }
  return false;
}

absl::Status Engine::Step(const std::vector<StepItem>& items, std::vector<StepOutput>* outputs) {
  outputs->clear();
  if (items.empty()) return absl::OkStatus();
  chunks_.clear();
  for (const StepItem& it : items) {
    Sequence* s = it.seq;
    if (s == nullptr || s->finished()) {
      return absl::InvalidArgumentError("Step: null or finished sequence");
    }
    if (it.hidden && !backend_->returns_hidden()) {
      return absl::InvalidArgumentError(absl::StrCat("Step: the ", DeviceName(backend_->device()),
                                                     " backend does not return hidden states"));
    }
    const int64_t n = std::min(it.max_tokens, s->num_pending());
    if (n <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("Step: sequence ", s->id(),
                                                     " has nothing to run"));
    }
    const int64_t need = backend_->BlocksFor(s->num_computed() + n) -
                         static_cast<int64_t>(s->block_table().size());
    if (need > 0) {
      if (auto st = backend_->allocator().Allocate(need, &s->block_table()); !st.ok()) return st;
    }
    SeqChunk ch;
    ch.tokens = s->tokens().subspan(s->num_computed(), n);
    ch.start_pos = s->num_computed();
    ch.block_table = s->block_table();
    ch.logits = n == s->num_pending() ? LogitsMode::kLast : LogitsMode::kNone;
    ch.hidden = it.hidden;
    chunks_.push_back(ch);
  }
  sampled_.assign(items.size(), -1);
  if (backend_->samples_on_device()) {
    // The backend samples each logits row (one per chunk in kLast mode, in
    // chunk order) with the draw the host sampler would have made.
    rows_.clear();
    for (size_t i = 0; i < items.size(); ++i) {
      if (chunks_[i].logits == LogitsMode::kNone) continue;
      Sequence* s = items[i].seq;
      rows_.push_back(s->sampler().Next(s->tokens()));
    }
    if (auto st = backend_->ForwardSample(chunks_, rows_, &row_tokens_); !st.ok()) return st;
    if (row_tokens_.size() != rows_.size()) {
      return absl::InternalError(absl::StrCat("ForwardSample returned ", row_tokens_.size(),
                                              " tokens for ", rows_.size(), " rows"));
    }
    size_t r = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      if (chunks_[i].logits != LogitsMode::kNone) sampled_[i] = row_tokens_[r++];
    }
  } else {
    if (auto st = backend_->Forward(chunks_, &out_); !st.ok()) return st;
    const int64_t vocab = model_->config.vocab_size;
    // Sampling is per sequence (each has its own sampler and RNG), so the
    // batch's rows are sampled in parallel; bookkeeping stays in order.
    pool_->ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (out_.first_row[i] < 0) continue;
        Sequence* s = items[i].seq;
        sampled_[i] = s->sampler().Sample(out_.row(out_.first_row[i]), vocab, s->tokens());
      }
    });
  }
  for (size_t i = 0; i < items.size(); ++i) {
    Sequence* s = items[i].seq;
    s->MarkComputed(static_cast<int64_t>(chunks_[i].tokens.size()));
    StepOutput o{s, -1};
    if (chunks_[i].hidden) {
      o.hidden = out_.hidden_row(out_.first_hidden_row[i]);
      o.hidden_pos = chunks_[i].start_pos;
      o.hidden_rows = static_cast<int64_t>(chunks_[i].tokens.size());
      o.hidden_dim = out_.hidden_dim;
    }
    if (chunks_[i].logits != LogitsMode::kNone) {
      const int32_t tok = sampled_[i];
      if (IsStopToken(*s, tok)) {
        s->Finish(FinishReason::kStop);
      } else {
        s->Append(tok);
        o.token = tok;
        if (s->num_generated() >= s->options().max_new_tokens) s->Finish(FinishReason::kLength);
      }
    }
    outputs->push_back(o);
  }
  return absl::OkStatus();
}

void Engine::Release(Sequence* seq) {
  if (seq == nullptr || seq->block_table().empty()) return;
  // Blocks came from this allocator; a failure here is a programmer error
  // that must not take the engine down.
  (void)backend_->allocator().Free(seq->block_table());
  seq->block_table().clear();
}

std::vector<GenerateResult> Engine::GenerateBatch(const std::vector<GenerateRequest>& requests) {
  const size_t n = requests.size();
  std::vector<GenerateResult> results(n);
  std::vector<std::unique_ptr<Sequence>> seqs(n);
  std::deque<size_t> waiting;
  for (size_t i = 0; i < n; ++i) {
    results[i].prompt_tokens = static_cast<int64_t>(requests[i].prompt.size());
    auto s = NewSequence(requests[i].prompt, requests[i].sampling, requests[i].options);
    if (!s.ok()) {
      results[i].status = s.status();
      results[i].finish_reason = FinishReason::kError;
      continue;
    }
    if (requests[i].on_hidden && !backend_->returns_hidden()) {
      results[i].status = absl::InvalidArgumentError(absl::StrCat(
          "the ", DeviceName(backend_->device()), " backend does not return hidden states"));
      results[i].finish_reason = FinishReason::kError;
      continue;
    }
    seqs[i] = std::move(*s);
    if (requests[i].options.max_new_tokens == 0) {
      seqs[i]->Finish(FinishReason::kLength);
      results[i].finish_reason = FinishReason::kLength;
      continue;
    }
    waiting.push_back(i);
  }

  std::vector<size_t> running;
  int64_t reserved = 0;  // worst-case blocks of the running sequences
  std::vector<StepItem> items;
  std::vector<size_t> item_req;  // request index of items[k]
  std::vector<StepOutput> outs;
  auto finish = [&](size_t i) {
    Sequence* s = seqs[i].get();
    Release(s);
    reserved -= MaxBlocksNeeded(*s);
    results[i].finish_reason = s->finish_reason();
    results[i].status = s->status();
    results[i].tokens.assign(s->generated().begin(), s->generated().end());
  };

  while (!waiting.empty() || !running.empty()) {
    // FCFS admission: never over-commit the cache, so no step can run out.
    while (!waiting.empty() &&
           reserved + MaxBlocksNeeded(*seqs[waiting.front()]) <= backend_->num_blocks()) {
      reserved += MaxBlocksNeeded(*seqs[waiting.front()]);
      running.push_back(waiting.front());
      waiting.pop_front();
    }
    // Decoding sequences first (one token each), then prompt chunks under
    // the remaining token budget.
    items.clear();
    item_req.clear();
    int64_t budget = options_.max_batch_tokens;
    for (size_t i : running) {
      if (!seqs[i]->in_prefill()) {
        items.push_back({seqs[i].get(), 1, static_cast<bool>(requests[i].on_hidden)});
        item_req.push_back(i);
        --budget;
      }
    }
    for (size_t i : running) {
      if (seqs[i]->in_prefill() && budget > 0) {
        const int64_t take = std::min(budget, seqs[i]->num_pending());
        items.push_back({seqs[i].get(), take, static_cast<bool>(requests[i].on_hidden)});
        item_req.push_back(i);
        budget -= take;
      }
    }
    absl::Status st = Step(items, &outs);
    if (!st.ok()) {
      for (const StepItem& it : items) it.seq->Finish(FinishReason::kError, st);
    } else {
      for (size_t k = 0; k < outs.size(); ++k) {  // outs[k] belongs to items[k]
        const GenerateRequest& req = requests[item_req[k]];
        if (outs[k].hidden != nullptr) {
          req.on_hidden(outs[k].hidden_pos, outs[k].hidden, outs[k].hidden_rows,
                        outs[k].hidden_dim);
        }
        if (outs[k].token < 0) continue;
        if (req.on_token && !req.on_token(outs[k].token)) {
          outs[k].seq->Finish(FinishReason::kCancelled);
        }
      }
    }
    std::vector<size_t> still;
    for (size_t i : running) {
      if (seqs[i]->finished()) {
        finish(i);
      } else {
        still.push_back(i);
      }
    }
    running.swap(still);
  }
  return results;
}

absl::StatusOr<GenerateResult> Engine::Generate(const std::vector<int32_t>& prompt,
                                                const SamplingParams& sampling,
                                                const GenerateOptions& options,
                                                const TokenCallback& on_token) {
  std::vector<GenerateRequest> reqs(1);
  reqs[0].prompt = prompt;
  reqs[0].sampling = sampling;
  reqs[0].options = options;
  reqs[0].on_token = on_token;
  std::vector<GenerateResult> r = GenerateBatch(reqs);
  if (!r[0].status.ok()) return r[0].status;
  return std::move(r[0]);
}

}  // namespace spear::engine
