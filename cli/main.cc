// spear: the command-line entry point. Flag parsing and dispatch only; the
// work lives in the libraries.
#include <cstdio>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/serve.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {

constexpr char kUsage[] =
    "usage: spear <command> [flags]\n"
    "commands:\n"
    "  pull NAME        fetch a known model into the cache, print its path\n"
    "  info             show a model's config, tensors and tokenizer\n"
    "  generate         stream a completion for a prompt\n"
    "  eval             token-level perplexity of a text (--models A,B,C: a comparison table)\n"
    "  bench            prefill/decode speed (--device cpu|cuda|auto)\n"
    "  quantize         FP16 model -> W4 (+SPEAR error compensators) .spear checkpoint\n"
    "  serve            router + N workers as one local cluster (gRPC)\n"
    "  client           send a request to a router (stream, unary, tokenize, list models)\n"
    "  bench load       open-loop Poisson load against a router\n"
    "`spear <command> --help` lists a command's flags.\n";

}  // namespace

int main(int argc, char** argv) {
  // Log lines go to stderr: stdout carries results (tables, --json objects,
  // generated text) that callers parse.
  spdlog::set_default_logger(spdlog::stderr_color_mt("spear"));
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  if (cmd == "pull") return spear::cli::CmdPull(args);
  if (cmd == "info") return spear::cli::CmdInfo(args);
  if (cmd == "generate") return spear::cli::CmdGenerate(args);
  if (cmd == "eval") return spear::cli::CmdEval(args);
  if (cmd == "bench" && !args.empty() && args[0] == "load") {
    return spear::cli::CmdBenchLoad(std::vector<std::string>(args.begin() + 1, args.end()));
  }
  if (cmd == "bench") return spear::cli::CmdBench(args);
  if (cmd == "serve") return spear::cli::CmdServe(args);
  if (cmd == "client") return spear::cli::CmdClient(args);
  if (cmd == "quantize") return spear::cli::CmdQuantize(args);
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::fprintf(stderr, "spear: unknown command '%s'\n%s", cmd.c_str(), kUsage);
  return 2;
}
