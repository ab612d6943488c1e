#include "worker/quantize/pipeline/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/engine/engine.h"
#include "worker/model/tokenizer.h"

namespace spear::quantize {
namespace {

absl::StatusOr<std::vector<std::vector<int32_t>>> FromTextFile(const model::LoadedModel& model,
                                                               const CalibrationOptions& o) {
  if (model.tokenizer == nullptr) {
    return absl::FailedPreconditionError("calibration from a text file needs a tokenizer");
  }
  std::ifstream f(o.text_file, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", o.text_file));
  std::stringstream ss;
  ss << f.rdbuf();
  const std::vector<int32_t> ids = model.tokenizer->Encode(ss.str(), /*add_bos=*/false);
  const int64_t windows = std::min<int64_t>(o.num_sequences,
                                            static_cast<int64_t>(ids.size()) / o.seq_len);
  if (windows < 1) {
    return absl::InvalidArgumentError(absl::StrCat(o.text_file, " has ", ids.size(),
                                                   " tokens: not one window of ", o.seq_len));
  }
  std::vector<std::vector<int32_t>> out;
  for (int64_t w = 0; w < windows; ++w) {
    out.emplace_back(ids.begin() + w * o.seq_len, ids.begin() + (w + 1) * o.seq_len);
  }
  return out;
}

// The prompts of o (prompt_file's first `needed` non-empty lines tokenized,
// or prompt_ids), each checked to leave at least half of a sample to the
// model; empty when o has none. Samples use prompts 0, 1, ... in order, so
// lines past the first `needed` would never be used (a file may hold far
// more topics than one run samples) and are not read.
absl::StatusOr<std::vector<std::vector<int32_t>>> LoadPrompts(const model::LoadedModel& model,
                                                              const CalibrationOptions& o,
                                                              int64_t sample_len, int64_t needed) {
  std::vector<std::vector<int32_t>> out;
  if (o.prompt_chat && o.prompt_file.empty()) {
    return absl::InvalidArgumentError("calibration: chat prompts need a prompt file");
  }
  if (o.prompt_file.empty() && o.prompt_ids.empty()) return out;
  if (!o.prompt_file.empty() && !o.prompt_ids.empty()) {
    return absl::InvalidArgumentError("calibration: prompts from a file or as ids, not both");
  }
  if (!(o.prompt_fraction > 0 && o.prompt_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration prompt_fraction must be in (0, 1], got ", o.prompt_fraction));
  }
  if (o.random_start_fraction > 0) {
    return absl::InvalidArgumentError("calibration: prompts and random starts exclude each other");
  }
  std::vector<std::string> where;  // for errors: "FILE line N" or "prompt N"
  if (!o.prompt_file.empty()) {
    if (model.tokenizer == nullptr) {
      return absl::FailedPreconditionError("calibration prompts from a file need a tokenizer");
    }
    std::ifstream f(o.prompt_file, std::ios::binary);
    if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", o.prompt_file));
    std::string line;
    for (int64_t n = 1; static_cast<int64_t>(out.size()) < needed && std::getline(f, line); ++n) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      if (o.prompt_chat) {
        auto text = model::ApplyChatTemplate(*model.tokenizer, {{"user", line}},
                                             /*add_generation_prompt=*/true);
        if (!text.ok()) {
          return absl::FailedPreconditionError(absl::StrCat(
              "calibration chat prompts: ", text.status().message()));
        }
        line = std::move(*text);
      }
      out.push_back(model.tokenizer->Encode(line, /*add_bos=*/false));
      where.push_back(absl::StrCat(o.prompt_file, " line ", n));
    }
    if (out.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(o.prompt_file, " has no prompt (no non-empty line)"));
    }
  } else {
    out = o.prompt_ids;
    for (size_t i = 0; i < out.size(); ++i) where.push_back(absl::StrCat("prompt ", i));
  }
  const int64_t limit = sample_len / 2;  // prompt + BOS < half a sample
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t len = static_cast<int64_t>(out[i].size()) + 1;
    if (out[i].empty() || len >= limit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "calibration ", where[i], ": ", out[i].size(), " tokens; a prompt needs 1 to ", limit - 2,
          " tokens with samples of ", sample_len));
    }
    for (int32_t id : out[i]) {
      if (id < 0 || id >= model.config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("calibration ", where[i], ": token id ", id,
                                                       " outside the vocabulary"));
      }
    }
  }
  return out;
}

}  // namespace

namespace {

template <class T>
std::vector<T> SpreadAmongT(std::vector<T> a, std::vector<T> b) {
  const int64_t S = static_cast<int64_t>(a.size()), M = static_cast<int64_t>(b.size());
  std::vector<T> out;
  out.reserve(static_cast<size_t>(S + M));
  int64_t j = 0;
  for (int64_t i = 0; i < S; ++i) {
    out.push_back(std::move(a[i]));
    // b[j] follows a[max(0, floor((j + 1) S / M) - 1)]
    while (j < M && ((j + 1) * S) / M - 1 <= i) out.push_back(std::move(b[j++]));
  }
  while (j < M) out.push_back(std::move(b[j++]));
  return out;
}

}  // namespace

std::vector<std::vector<int32_t>> SpreadAmong(std::vector<std::vector<int32_t>> a,
                                              std::vector<std::vector<int32_t>> b) {
  return SpreadAmongT(std::move(a), std::move(b));
}

absl::StatusOr<std::vector<std::vector<int32_t>>> MakeCalibrationSequences(
    const model::LoadedModel& model, const CalibrationOptions& o, int num_threads,
    const std::function<void(int64_t, int64_t)>& progress) {
  auto set = MakeCalibrationSet(model, o, num_threads, false, progress);
  if (!set.ok()) return set.status();
  return std::move(set->sequences);
}

absl::StatusOr<CalibrationSet> MakeCalibrationSet(
    const model::LoadedModel& model, const CalibrationOptions& o, int num_threads,
    bool capture_hidden, const std::function<void(int64_t, int64_t)>& progress) {
  if (o.num_sequences < 1 || o.seq_len < 2) {
    return absl::InvalidArgumentError("calibration needs num_sequences >= 1 and seq_len >= 2");
  }
  if (!o.text_file.empty()) {
    if (!o.mix_texts.empty()) {
      return absl::InvalidArgumentError("calibration: a text mix only goes with self-generated data");
    }
    if (!o.prompt_file.empty() || !o.prompt_ids.empty() || o.prompt_chat) {
      return absl::InvalidArgumentError("calibration: prompts only go with self-generated data");
    }
    auto win = FromTextFile(model, o);
    if (!win.ok()) return win.status();
    CalibrationSet set;
    set.final_hidden.resize(win->size());
    set.sequences = std::move(*win);
    return set;
  }
  if (!o.mix_texts.empty()) {
    for (const auto& m : o.mix_texts) {
      if (m.sequences < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("calibration: the text mix '", m.file, "' needs >= 1 window"));
      }
    }
    CalibrationOptions self = o;
    self.mix_texts.clear();
    auto gen = MakeCalibrationSet(model, self, num_threads, capture_hidden, progress);
    if (!gen.ok()) return gen.status();
    std::vector<std::vector<int32_t>> win;
    for (const auto& m : o.mix_texts) {
      CalibrationOptions text = self;
      text.text_file = m.file;
      text.num_sequences = m.sequences;
      auto w = FromTextFile(model, text);
      if (!w.ok()) return w.status();
      // A later text's windows spread evenly among the earlier ones' (the
      // first text's among none: itself).
      win = SpreadAmongT(std::move(win), std::move(*w));
    }
    CalibrationSet set;
    set.final_hidden = SpreadAmongT(std::move(gen->final_hidden),
                                    std::vector<std::vector<float>>(win.size()));
    set.sequences = SpreadAmongT(std::move(gen->sequences), std::move(win));
    return set;
  }
  if (!(o.temperature > 0 && o.temperature <= 10)) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration temperature must be in (0, 10], got ", o.temperature));
  }
  if (!(o.top_p > 0 && o.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("calibration top_p must be in (0, 1], got ", o.top_p));
  }
  if (o.windows_per_sequence < 1 || o.windows_per_sequence > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration windows_per_sequence must be in [1, 64], got ", o.windows_per_sequence));
  }
  if (!(o.random_start_fraction >= 0 && o.random_start_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration random_start_fraction must be in [0, 1], got ", o.random_start_fraction));
  }
  const int64_t sample_len = o.seq_len * o.windows_per_sequence;
  if (o.random_start_fraction > 0 && sample_len < 3) {
    return absl::InvalidArgumentError("calibration with random starts needs samples of >= 3 tokens");
  }
  // Samples i = 0 .. N - 1 take prompt floor(i f) (mod the count).
  const int64_t needed =
      static_cast<int64_t>(std::floor((o.num_sequences - 1) * o.prompt_fraction)) + 1;
  auto prompts = LoadPrompts(model, o, sample_len, needed);
  if (!prompts.ok()) return prompts.status();

  const model::ModelConfig& c = model.config;
  int64_t bos = c.bos_token_id;
  if (bos < 0 && model.tokenizer != nullptr) bos = model.tokenizer->bos_id();
  if (bos >= c.vocab_size) bos = -1;
  std::mt19937_64 rng(o.seed);
  // Candidates for a random start: every id that is not a special token.
  std::vector<int32_t> plain;
  if (o.random_start_fraction > 0) {
    for (int32_t id = 0; id < c.vocab_size; ++id) {
      if (model.tokenizer == nullptr || !model.tokenizer->IsSpecial(id)) plain.push_back(id);
    }
    if (plain.empty()) return absl::InvalidArgumentError("calibration: no non-special token to start from");
  }
  std::mt19937_64 start_rng(o.seed ^ 0x9e3779b97f4a7c15ull);

  // Capture: one window per sample (a later window's states would see the
  // earlier windows, which its training sequence does not), one more token
  // sampled so that the model runs the last kept position (so not when
  // that token would pass the model's context length).
  const bool capture = capture_hidden && o.windows_per_sequence == 1 &&
                       (c.max_position <= 0 || sample_len + 1 <= c.max_position);
  const int64_t run_len = sample_len + (capture ? 1 : 0);
  // Up to 256 sequences decode together (their worst-case KV fits
  // exactly), fewer where their fp32 KV would pass 4 GiB: wider decode
  // batches amortize the GEMM's weight packing (SmolLM2, 128 x 256 tokens:
  // 176 s at 128 against 190 s at 64; 256 x 256: 224 s at 256 against 237
  // s at 128, two runs each; docs/results/quality.md).
  const int64_t kv_bytes_per_seq =
      run_len * c.num_layers * 2 * static_cast<int64_t>(c.num_kv_heads) * c.head_dim * 4;
  const int64_t by_memory =
      std::max<int64_t>(1, (int64_t{4} << 30) / std::max<int64_t>(1, kv_bytes_per_seq));
  const int64_t concurrent = std::min({o.num_sequences, int64_t{256}, by_memory});
  engine::EngineOptions eo;
  eo.num_threads = num_threads;
  eo.kv_cache.block_size = 16;
  eo.kv_cache.num_blocks = concurrent * ((run_len + 15) / 16);
  eo.max_batch_tokens = 512;
  auto eng = engine::Engine::Create(&model, eo);
  if (!eng.ok()) return eng.status();

  const int64_t total = o.num_sequences * sample_len;
  int64_t done = 0;
  const int64_t d = c.hidden_size;
  std::vector<std::vector<float>> hidden(static_cast<size_t>(o.num_sequences));
  std::vector<engine::GenerateRequest> reqs(static_cast<size_t>(o.num_sequences));
  for (int64_t i = 0; i < o.num_sequences; ++i) {
    engine::GenerateRequest& r = reqs[static_cast<size_t>(i)];
    const int32_t first =
        bos >= 0 ? static_cast<int32_t>(bos)
                 : static_cast<int32_t>(rng() % static_cast<uint64_t>(c.vocab_size));
    r.prompt = {first};
    // Sample i is prompted when floor((i + 1) f) > floor(i f), with the
    // prompts in order (cycled): prompt floor(i f) mod P.
    const double pf = o.prompt_fraction;
    if (!prompts->empty() && std::floor((i + 1) * pf) > std::floor(i * pf)) {
      const auto& pr = (*prompts)[static_cast<size_t>(std::floor(i * pf)) % prompts->size()];
      // No BOS of the sample's own in front of one the prompt already has
      // (a chat rendering may start with it).
      if (bos < 0 || pr.front() == bos) r.prompt.clear();
      r.prompt.insert(r.prompt.end(), pr.begin(), pr.end());
    }
    // Sample i starts randomly when floor((i + 1) f) > floor(i f): an even
    // spread of round(N f) random starts over the set.
    const double f = o.random_start_fraction;
    if (f > 0 && std::floor((i + 1) * f) > std::floor(i * f)) {
      const int32_t word = plain[start_rng() % plain.size()];
      if (bos >= 0) {
        r.prompt.push_back(word);
      } else {
        r.prompt = {word};
      }
    }
    r.sampling.temperature = static_cast<float>(o.temperature);
    r.sampling.top_p = static_cast<float>(o.top_p);
    r.sampling.seed = o.seed * 1000003ull + static_cast<uint64_t>(i);
    r.options.max_new_tokens = run_len - static_cast<int64_t>(r.prompt.size());
    r.options.stop_on_eos = false;
    if (capture) {
      std::vector<float>* dst = &hidden[static_cast<size_t>(i)];
      dst->assign(static_cast<size_t>(sample_len * d), 0.f);
      // rows are [count, d] (the model's hidden size); positions >=
      // sample_len are not run (see run_len).
      r.on_hidden = [dst, sample_len, d](int64_t pos, const float* rows, int64_t count, int64_t) {
        const int64_t n = std::min(count, sample_len - pos);
        if (n > 0) std::copy(rows, rows + n * d, dst->begin() + pos * d);
      };
    }
    if (progress) {
      r.on_token = [&](int32_t) {
        if (++done % 256 == 0) progress(std::min(done, total), total);
        return true;
      };
    }
  }
  std::vector<engine::GenerateResult> res = (*eng)->GenerateBatch(reqs);
  CalibrationSet out;
  for (size_t i = 0; i < res.size(); ++i) {
    if (!res[i].status.ok()) return res[i].status;
    std::vector<int32_t> seq = reqs[i].prompt;
    seq.insert(seq.end(), res[i].tokens.begin(), res[i].tokens.end());
    if (static_cast<int64_t>(seq.size()) != run_len) {
      return absl::InternalError(absl::StrCat("calibration sequence ", i, " has ", seq.size(),
                                              " tokens, expected ", run_len));
    }
    seq.resize(static_cast<size_t>(sample_len));  // capture's extra token
    for (int64_t w = 0; w < o.windows_per_sequence; ++w) {
      out.sequences.emplace_back(seq.begin() + w * o.seq_len, seq.begin() + (w + 1) * o.seq_len);
      out.final_hidden.push_back(std::move(hidden[i]));  // empty unless captured (W = 1)
    }
  }
  if (progress) progress(total, total);
  return out;
}

}  // namespace spear::quantize
