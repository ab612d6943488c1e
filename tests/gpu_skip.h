// SKIP_WITHOUT_GPU(): the first statement of every gpu-labelled test: skips
// with a message (why, and where GPU tests run) when no CUDA device is
// usable, so the CPU-only CI reports a skip, never a failure.
#pragma once

#include <string>

#include "gtest/gtest.h"
#include "kernels/cuda_ops.h"

#define SKIP_WITHOUT_GPU()                                                                   \
  do {                                                                                       \
    auto spear_gpu_n_ = ::spear::kernels::cuda::DeviceCount();                               \
    if (!spear_gpu_n_.ok() || *spear_gpu_n_ == 0) {                                          \
      GTEST_SKIP() << "no CUDA device present ("                                             \
                   << (spear_gpu_n_.ok() ? std::string("0 devices")                          \
                                         : std::string(spear_gpu_n_.status().message()))     \
                   << "); GPU tests run on the GPU machine (scripts/gpu/)";                  \
    }                                                                                        \
  } while (0)
