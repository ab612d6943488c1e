// The `spear` subcommands. Each takes the arguments after its name and
// returns the process exit code: 0 success, 1 runtime failure, 2 bad
// command line. Errors are printed to stderr.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace spear::cli {

int CmdPull(const std::vector<std::string>& args);
int CmdInfo(const std::vector<std::string>& args);
int CmdGenerate(const std::vector<std::string>& args);
int CmdEval(const std::vector<std::string>& args);
int CmdBench(const std::vector<std::string>& args);
int CmdQuantize(const std::vector<std::string>& args);

class Flags;
// `spear eval --models A,B,...` (cmd_eval_table.cc), given CmdEval's parsed flags.
int EvalModelsTable(const Flags& flags);

// Prints `status` as "spear <cmd>: <message>" and maps it to an exit code
// (InvalidArgument from flag parsing -> 2, anything else -> 1).
int Fail(const std::string& cmd, const absl::Status& status, bool usage_error = false);

}  // namespace spear::cli
