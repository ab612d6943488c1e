// spear generate / spear eval.
#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/model_session.h"
#include "nlohmann/json.hpp"
#include "worker/engine/perplexity.h"
#include "worker/model/tokenizer.h"

namespace spear::cli {

int CmdGenerate(const std::vector<std::string>& args) {
  Flags f("generate");
  f.Declare("model", "", "model path or cache name")
      .Declare("prompt", "", "prompt text")
      .Declare("prompt-ids", "", "prompt as token ids, e.g. \"1 2 3\" (models without tokenizer)")
      .DeclareBool("chat", "format the prompt with the model's chat template")
      .Declare("system", "", "system message (with --chat)")
      .Declare("max-tokens", "128", "tokens to generate at most")
      .Declare("temperature", "0", "0 = greedy")
      .Declare("top-k", "0", "0 = off")
      .Declare("top-p", "1", "nucleus mass, 1 = off")
      .Declare("seed", "0", "sampling seed")
      .Declare("repetition-penalty", "1", "1 = off")
      .DeclareBool("ignore-eos", "keep generating after the end-of-sequence token")
      .Declare("threads", "0", "CPU threads, 0 = all")
      .Declare("device", "cpu", "cpu | cuda | auto (cuda when built with CUDA and a GPU is present)")
      .DeclareBool("quiet", "no statistics on stderr")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("generate", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (f.Str("prompt").empty() && f.Str("prompt-ids").empty()) {
    return Fail("generate", absl::InvalidArgumentError("--prompt or --prompt-ids is required"), true);
  }
  if (f.Str("model").empty()) {
    return Fail("generate", absl::InvalidArgumentError("--model is required"), true);
  }
  auto max_tokens = f.Int("max-tokens", 0, 1 << 20);
  auto temp = f.Double("temperature", 0, 100);
  auto top_k = f.Int("top-k", 0, 1 << 30);
  auto top_p = f.Double("top-p", 1e-9, 1);
  auto seed = f.Int("seed", 0, INT64_MAX);
  auto rep = f.Double("repetition-penalty", 1e-6, 100);
  auto threads = f.Int("threads", 0, 1024);
  auto device = DeviceFlag(f.Str("device"));
  for (const absl::Status& s : {max_tokens.status(), temp.status(), top_k.status(), top_p.status(),
                                seed.status(), rep.status(), threads.status(), device.status()}) {
    if (!s.ok()) return Fail("generate", s, true);
  }
  // Room for the prompt (up to 4096 tokens) and the generated tokens.
  auto session = OpenModel(f.Str("model"), static_cast<int>(*threads), 4096 + *max_tokens, *device,
                           f.Bool("quiet"));
  if (!session.ok()) return Fail("generate", session.status());
  const model::LoadedModel& m = *session->model;
  auto prompt = PromptTokens(m, f.Str("prompt"), f.Str("prompt-ids"), f.Bool("chat"), f.Str("system"));
  if (!prompt.ok()) return Fail("generate", prompt.status(), true);

  engine::SamplingParams sp;
  sp.temperature = static_cast<float>(*temp);
  sp.top_k = static_cast<int>(*top_k);
  sp.top_p = static_cast<float>(*top_p);
  sp.seed = static_cast<uint64_t>(*seed);
  sp.repetition_penalty = static_cast<float>(*rep);
  engine::GenerateOptions go;
  go.max_new_tokens = *max_tokens;
  go.stop_on_eos = !f.Bool("ignore-eos");

  std::unique_ptr<model::StreamingDecoder> dec;
  if (m.tokenizer) dec = std::make_unique<model::StreamingDecoder>(m.tokenizer.get());
  const double t0 = NowSeconds();
  double t_first = 0;
  int64_t n = 0;
  auto result = session->engine->Generate(*prompt, sp, go, [&](int32_t tok) {
    if (n++ == 0) t_first = NowSeconds();
    if (dec) {
      std::fputs(dec->Push(tok).c_str(), stdout);
    } else {
      std::printf("%d ", tok);
    }
    std::fflush(stdout);
    return true;
  });
  if (dec) std::fputs(dec->Flush().c_str(), stdout);
  std::printf("\n");
  std::fflush(stdout);  // the statistics go to stderr after the text
  if (!result.ok()) return Fail("generate", result.status());
  const double t1 = NowSeconds();
  if (!f.Bool("quiet")) {
    const double decode_s = t1 - t_first;
    std::fprintf(stderr,
                 "[%zu prompt tokens, %lld generated; load %.2f s, prefill %.3f s (%.1f tok/s), "
                 "decode %.1f tok/s]\n",
                 prompt->size(), static_cast<long long>(n), session->load_seconds,
                 (n ? t_first : t1) - t0, prompt->size() / std::max(1e-9, (n ? t_first : t1) - t0),
                 n > 1 ? (n - 1) / std::max(1e-9, decode_s) : 0.0);
  }
  return 0;
}

int CmdEval(const std::vector<std::string>& args) {
  Flags f("eval");
  f.Declare("model", "", "model path or cache name")
      .Declare("models", "", "comma-separated models to compare in one table (instead of --model)")
      .Declare("labels", "", "labels of --models, e.g. FP16,W4,W4+SPEAR (default: the model names)")
      .Declare("reference-fp16", "", "label or model of --models that is the FP16 reference (default: first)")
      .Declare("reference-w4", "", "label or model of --models that is the plain W4 reference (default: second)")
      .DeclareBool("record", "with --models: store each .spear model's result in its spear.json (\"measured\")")
      .Declare("text", "", "UTF-8 text file to score")
      .Declare("ctx", "512", "window length in tokens")
      .Declare("max-tokens", "0", "score only the first N tokens of the text (0 = all)")
      .Declare("threads", "0", "CPU threads, 0 = all")
      .Declare("device", "cpu", "cpu | cuda | auto (cuda when built with CUDA and a GPU is present)")
      .DeclareBool("json", "print one JSON object instead of text")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("eval", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (f.Has("models")) {
    if (f.Has("model")) {
      return Fail("eval", absl::InvalidArgumentError("give --model or --models, not both"), true);
    }
    return EvalModelsTable(f);
  }
  for (const char* only_table : {"labels", "reference-fp16", "reference-w4", "record"}) {
    if (f.Has(only_table)) {
      return Fail("eval", absl::InvalidArgumentError(absl::StrCat("--", only_table, " needs --models")), true);
    }
  }
  auto ctx = f.Int("ctx", 2, 1 << 20);
  auto max_tokens = f.Int("max-tokens", 0, INT64_MAX);
  auto threads = f.Int("threads", 0, 1024);
  auto device = DeviceFlag(f.Str("device"));
  for (const absl::Status& s : {ctx.status(), max_tokens.status(), threads.status(), device.status()}) {
    if (!s.ok()) return Fail("eval", s, true);
  }
  if (f.Str("model").empty()) return Fail("eval", absl::InvalidArgumentError("--model is required"), true);
  if (f.Str("text").empty()) return Fail("eval", absl::InvalidArgumentError("--text is required"), true);
  auto text_or = ReadTextFile(f.Str("text"));
  if (!text_or.ok()) return Fail("eval", text_or.status());
  const std::string text = std::move(*text_or);

  auto session = OpenModel(f.Str("model"), static_cast<int>(*threads), *ctx, *device);
  if (!session.ok()) return Fail("eval", session.status());
  const model::LoadedModel& m = *session->model;
  if (m.tokenizer == nullptr) {
    return Fail("eval", absl::FailedPreconditionError("the model has no tokenizer"));
  }
  const double t_tok = NowSeconds();
  std::vector<int32_t> tokens = m.tokenizer->Encode(text, /*add_bos=*/false);
  const double tok_s = NowSeconds() - t_tok;
  const bool json = f.Bool("json");
  const bool tty = isatty(fileno(stderr));
  const double t0 = NowSeconds();
  auto progress = [&](int64_t done, int64_t total, double ppl) {
    if (!tty && json) return;
    const double el = NowSeconds() - t0;
    const int width = 30;
    const int filled = static_cast<int>(width * done / std::max<int64_t>(1, total));
    std::fprintf(stderr, "\r[%s%s] %lld/%lld windows  ppl %.4f  %.0f tok/s ",
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 static_cast<long long>(done), static_cast<long long>(total), ppl,
                 done * (*ctx) / std::max(1e-9, el));
    if (!tty && done != total) std::fprintf(stderr, "\n");
    if (done == total) std::fprintf(stderr, "\n");
  };
  auto r = engine::EvalPerplexity(session->engine->backend(), tokens, static_cast<int>(*ctx),
                                  *max_tokens > 0 ? *max_tokens : static_cast<int64_t>(tokens.size()),
                                  progress);
  if (!r.ok()) return Fail("eval", r.status());
  const double secs = NowSeconds() - t0;
  const int64_t evaluated = r->windows * (*ctx);
  if (json) {
    nlohmann::json j = {{"model", f.Str("model")},
                        {"text", f.Str("text")},
                        {"ppl", r->ppl},
                        {"nll_sum", r->nll_sum},
                        {"tokens", evaluated},
                        {"tokens_scored", r->tokens_scored},
                        {"text_tokens", tokens.size()},
                        {"windows", r->windows},
                        {"ctx", *ctx},
                        {"seconds", secs},
                        {"tokens_per_second", evaluated / std::max(1e-9, secs)}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("perplexity %.4f  (%lld windows x %lld tokens = %lld tokens, %lld scored; text has %zu "
                "tokens, tokenized in %.1f s; %.1f s, %.0f tok/s)\n",
                r->ppl, static_cast<long long>(r->windows), static_cast<long long>(*ctx),
                static_cast<long long>(evaluated), static_cast<long long>(r->tokens_scored),
                tokens.size(), tok_s, secs, evaluated / std::max(1e-9, secs));
  }
  return 0;
}

}  // namespace spear::cli
