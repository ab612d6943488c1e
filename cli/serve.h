// `spear serve`, `spear client` and `spear bench load`: the serving
// commands (cli/serve.cc, cli/client.cc, cli/bench_load.cc).
#pragma once

#include <string>
#include <vector>

namespace spear::cli {

// Starts N spear-worker processes and the router (in-process) as one local
// cluster; prints `LISTENING grpc=<port> metrics=<port> worker_metrics=<p1,p2,...>`.
int CmdServe(const std::vector<std::string>& args);
// A gRPC client of the public API (generate, stream, tokenize, list models).
int CmdClient(const std::vector<std::string>& args);
// Open-loop Poisson load against a router (or a worker, for the overhead run).
int CmdBenchLoad(const std::vector<std::string>& args);

}  // namespace spear::cli
