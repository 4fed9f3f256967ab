// Library information: error strings, compiled architectures, device count.  Never aborts, also on a
// machine without a CUDA driver or device.
#include "common.cuh"

#ifndef UMM_CUDA_ARCHS_STR
#define UMM_CUDA_ARCHS_STR "unknown"
#endif

extern "C" {

const char* umm_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

const char* umm_cuda_archs() { return UMM_CUDA_ARCHS_STR; }

int umm_cuda_device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the error behind for the next launcher's check
    return 0;
  }
  return n;
}

}  // extern "C"
