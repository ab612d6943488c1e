// Minimal command-line flag parsing for the `spear` subcommands.
//
// Accepts `--name value`, `--name=value` and boolean `--name`; every flag a
// subcommand reads must be declared first, so unknown or mistyped flags are
// errors (exit code 2), never silently ignored.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::cli {

class Flags {
 public:
  struct Spec {
    std::string name;
    std::string help;
    std::string default_value;  // "" = no default
    bool is_bool = false;
  };

  explicit Flags(std::string command) : command_(std::move(command)) {}
  Flags& Declare(std::string name, std::string default_value, std::string help);
  Flags& DeclareBool(std::string name, std::string help);

  // Parses args (after the subcommand). Positional arguments are collected.
  absl::Status Parse(const std::vector<std::string>& args);

  bool Has(const std::string& name) const;  // given on the command line
  std::string Str(const std::string& name) const;
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t min, int64_t max) const;
  absl::StatusOr<double> Double(const std::string& name, double min, double max) const;
  bool Bool(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  std::string Usage() const;

 private:
  const Spec* Find(const std::string& name) const;
  std::string command_;
  std::vector<Spec> specs_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

}  // namespace spear::cli
