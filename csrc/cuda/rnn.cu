// nvcc translation unit of the rnn kernels (csrc/cuda/kernels/rnn.cuh). No torch headers.
#include "cuda/kernels/rnn.cuh"

#include <string>

// (api.h) Asked of one kernel: every kernel is compiled for the same architectures.
std::string fusedrnn::cuda::kernel_image_missing(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();  // (clear it: torch's launch checks read the last error)
    return std::string("cannot select CUDA device ") + std::to_string(device);
  }
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(&rnn_fwd_step<float>));
  cudaGetLastError();
  cudaSetDevice(prev);
  if (e == cudaSuccess) return "";
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return "fusedrnn._C_cuda has no kernel code for this GPU (compute capability " + std::to_string(major) + "." +
         std::to_string(minor) + ": " + cudaGetErrorString(e) + "); reinstall with TORCH_CUDA_ARCH_LIST=\"" +
         std::to_string(major) + "." + std::to_string(minor) + "\" to build it";
}
