// Per-thread last-error message behind ep_last_error_string(), the ABI version and the
// runtime check.
#include "common.cuh"

namespace ep {
namespace {
thread_local char g_message[512] = "";
}

int set_error(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return code == 0 ? static_cast<int>(cudaErrorInvalidValue) : code;
}

int ok() {
  g_message[0] = '\0';
  return 0;
}
}  // namespace ep

extern "C" const char* ep_last_error_string(void) { return ep::g_message; }

// The library's (static) CUDA runtime can talk to this host's driver; *device_count GPUs.
extern "C" int ep_runtime_check(int* device_count_host) {
  *device_count_host = 0;
  return ep::check(cudaGetDeviceCount(device_count_host), "ep_runtime_check cudaGetDeviceCount");
}

// Bumped whenever an entry point's signature changes; cuda.py refuses a mismatched library.
extern "C" int ep_abi_version(void) { return 1; }
