#include "cli/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace spear::cli {

Flags& Flags::Declare(std::string name, std::string default_value, std::string help) {
  specs_.push_back({std::move(name), std::move(help), std::move(default_value), false});
  return *this;
}

Flags& Flags::DeclareBool(std::string name, std::string help) {
  specs_.push_back({std::move(name), std::move(help), "", true});
  return *this;
}

const Flags::Spec* Flags::Find(const std::string& name) const {
  for (const Spec& s : specs_) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

absl::Status Flags::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0 || a == "--") {
      positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Spec* spec = Find(name);
    if (spec == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " for `spear ",
                                                     command_, "`\n", Usage()));
    }
    if (spec->is_bool) {
      if (has_value && value != "true" && value != "false") {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      }
      values_[name] = has_value ? value : "true";
      continue;
    }
    if (!has_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
      value = args[++i];
    }
    values_[name] = value;
  }
  return absl::OkStatus();
}

bool Flags::Has(const std::string& name) const { return values_.count(name) > 0; }

std::string Flags::Str(const std::string& name) const {
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  const Spec* s = Find(name);
  return s ? s->default_value : std::string();
}

absl::StatusOr<int64_t> Flags::Int(const std::string& name, int64_t min, int64_t max) const {
  const std::string v = Str(name);
  int64_t out;
  if (!absl::SimpleAtoi(v, &out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be an integer, got '", v, "'"));
  }
  if (out < min || out > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", min, ", ", max, "], got ", out));
  }
  return out;
}

absl::StatusOr<double> Flags::Double(const std::string& name, double min, double max) const {
  const std::string v = Str(name);
  double out;
  if (!absl::SimpleAtod(v, &out) || !std::isfinite(out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be a number, got '", v, "'"));
  }
  if (out < min || out > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", min, ", ", max, "], got ", v));
  }
  return out;
}

bool Flags::Bool(const std::string& name) const { return Str(name) == "true"; }

std::string Flags::Usage() const {
  std::string out = absl::StrCat("usage: spear ", command_, " [flags]\n");
  for (const Spec& s : specs_) {
    absl::StrAppend(&out, "  --", s.name, s.is_bool ? "" : " VALUE", "\n      ", s.help);
    if (!s.default_value.empty()) absl::StrAppend(&out, " (default ", s.default_value, ")");
    absl::StrAppend(&out, "\n");
  }
  return out;
}

}  // namespace spear::cli
