#include "kernels/cuda/cublas_loader.h"

#include <dlfcn.h>

#include <mutex>

namespace spear::kernels::cuda::blas {
namespace {

#define SPEAR_STR2(x) #x
#define SPEAR_STR(x) SPEAR_STR2(x)

using CreateFn = cublasStatus_t (*)(cublasHandle_t*);
using DestroyFn = cublasStatus_t (*)(cublasHandle_t);
using SetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
using SetWorkspaceFn = cublasStatus_t (*)(cublasHandle_t, void*, size_t);
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);

struct Api {
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  SetStreamFn set_stream = nullptr;
  SetWorkspaceFn set_workspace = nullptr;
  GemmExFn gemm_ex = nullptr;
  std::string error;
};

template <typename F>
bool Sym(void* lib, const char* name, F* out, std::string* error) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out == nullptr && error->empty()) {
    const char* e = dlerror();
    *error = std::string("dlsym ") + name + ": " + (e != nullptr ? e : "not found");
  }
  return *out != nullptr;
}

const Api& Get() {
  static Api api;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* name = "libcublas.so." SPEAR_STR(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      api.error = std::string("dlopen ") + name + ": " + (e != nullptr ? e : "failed");
      return;
    }
    // Never dlclose'd: handles may outlive any owner.
    bool ok = Sym(lib, "cublasCreate_v2", &api.create, &api.error);
    ok = Sym(lib, "cublasDestroy_v2", &api.destroy, &api.error) && ok;
    ok = Sym(lib, "cublasSetStream_v2", &api.set_stream, &api.error) && ok;
    ok = Sym(lib, "cublasSetWorkspace_v2", &api.set_workspace, &api.error) && ok;
    ok = Sym(lib, "cublasGemmEx", &api.gemm_ex, &api.error) && ok;
    if (!ok) api = Api{.error = api.error};
  });
  return api;
}

}  // namespace

std::string LoadError() { return Get().error; }

cublasStatus_t Create(cublasHandle_t* handle) {
  const Api& a = Get();
  return a.create != nullptr ? a.create(handle) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t Destroy(cublasHandle_t handle) {
  const Api& a = Get();
  return a.destroy != nullptr ? a.destroy(handle) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t SetStream(cublasHandle_t handle, cudaStream_t stream) {
  const Api& a = Get();
  return a.set_stream != nullptr ? a.set_stream(handle, stream) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t SetWorkspace(cublasHandle_t handle, void* workspace, size_t bytes) {
  const Api& a = Get();
  return a.set_workspace != nullptr ? a.set_workspace(handle, workspace, bytes)
                                    : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t GemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                      int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                      int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                      void* C, cudaDataType Ctype, int ldc, cublasComputeType_t compute,
                      cublasGemmAlgo_t algo) {
  const Api& a = Get();
  return a.gemm_ex != nullptr ? a.gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B,
                                          Btype, ldb, beta, C, Ctype, ldc, compute, algo)
                              : CUBLAS_STATUS_NOT_INITIALIZED;
}

}  // namespace spear::kernels::cuda::blas
