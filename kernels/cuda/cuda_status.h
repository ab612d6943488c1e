// CUDA error handling: every runtime call is checked and turned into an
// absl::Status naming the call, the file and the line.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#define SPEAR_CUDA_RETURN_IF_ERROR(expr)                                                  \
  do {                                                                                    \
    const cudaError_t spear_cuda_err_ = (expr);                                           \
    if (spear_cuda_err_ != cudaSuccess) {                                                 \
      return absl::InternalError(absl::StrCat(#expr, " failed at ", __FILE__, ":",        \
                                              __LINE__, ": ",                             \
                                              cudaGetErrorString(spear_cuda_err_)));      \
    }                                                                                     \
  } while (0)
