// cuBLAS, opened with dlopen on first use instead of linked.
//
// Why: libcublasLt carries ~94 KB of static TLS. Linked into a process
// (DT_NEEDED), that TLS is carved out of every thread's stack, and civetweb
// (the HTTP server behind prometheus-cpp's Exposer) starts its threads with
// ~100 KB stacks: pthread_create fails and the Exposer throws "null context
// when constructing CivetServer" -- in spear-worker and spear serve even on
// the CPU backend. Opened with dlopen, cuBLAS's TLS is allocated per thread
// on demand instead. Only the calls SPEAR's runtime makes are wrapped; the
// benchmarks, which compare against cuBLAS and serve no metrics, link it.
//
// Each wrapper returns CUBLAS_STATUS_NOT_INITIALIZED when the library or the
// symbol cannot be loaded (LoadError() says why). Thread-safe.
#pragma once

#include <cublas_api.h>

#include <string>

namespace spear::kernels::cuda::blas {

// Empty when cuBLAS loaded, else the reason (dlopen/dlsym error).
std::string LoadError();

cublasStatus_t Create(cublasHandle_t* handle);
cublasStatus_t Destroy(cublasHandle_t handle);
cublasStatus_t SetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t SetWorkspace(cublasHandle_t handle, void* workspace, size_t bytes);
cublasStatus_t GemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                      int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                      int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                      void* C, cudaDataType Ctype, int ldc, cublasComputeType_t compute,
                      cublasGemmAlgo_t algo);

}  // namespace spear::kernels::cuda::blas
