// CUDA KV-layout kernels (see lmcsgl.h for the contracts). Every call only enqueues work on
// the given stream and returns the launch status as a cudaError_t.
#include "lmcsgl.h"

#include <cuda_runtime.h>

#include <algorithm>

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // one warp per (b, n) row
constexpr int kThreads = 256;     // byte-shuffle kernels
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <typename V>
__device__ __forceinline__ void copy_vec(char* __restrict__ d, const char* __restrict__ s,
                                         int64_t count, int lane) {
  V* dv = reinterpret_cast<V*>(d);
  const V* sv = reinterpret_cast<const V*>(s);
  for (int64_t k = lane; k < count; k += kWarp) dv[k] = sv[k];
}

// One warp copies one row with the widest access that the addresses and size allow.
__device__ __forceinline__ void copy_row(char* __restrict__ d, const char* __restrict__ s,
                                         int64_t row_bytes, int lane) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(d) | reinterpret_cast<uintptr_t>(s) |
                      static_cast<uintptr_t>(row_bytes);
  if ((a & 15) == 0) copy_vec<uint4>(d, s, row_bytes / 16, lane);
  else if ((a & 7) == 0) copy_vec<uint2>(d, s, row_bytes / 8, lane);
  else if ((a & 3) == 0) copy_vec<unsigned>(d, s, row_bytes / 4, lane);
  else copy_vec<unsigned char>(d, s, row_bytes, lane);
}

template <bool kScatter>
__global__ void rows_kernel(const int64_t* __restrict__ ptrs, int64_t num_slots,
                            int64_t row_bytes, const int64_t* __restrict__ slots,
                            char* __restrict__ flat, int64_t rows) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t r = first; r < rows; r += stride) {
    const int64_t b = r / num_slots;
    const int64_t n = r - b * num_slots;
    char* pool_row = reinterpret_cast<char*>(ptrs[b]) + slots[n] * row_bytes;
    char* flat_row = flat + r * row_bytes;
    if (kScatter) copy_row(pool_row, flat_row, row_bytes, lane);
    else copy_row(flat_row, pool_row, row_bytes, lane);
  }
}

// Byte planes, one thread per output byte (coalesced writes). kInverse: planes -> elements.
template <bool kInverse>
__global__ void byte_planes_kernel(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                   int64_t n, int64_t elem_size, int64_t nbytes) {
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < nbytes;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t major = o / (kInverse ? elem_size : n), minor = o - major * (kInverse ? elem_size : n);
    dst[o] = kInverse ? src[minor * n + major] : src[minor * elem_size + major];
  }
}

// 2-byte elements, one thread per element.
__global__ void shuffle2_kernel(const unsigned short* __restrict__ src, unsigned char* __restrict__ dst,
                                int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const unsigned short v = src[i];
    dst[i] = static_cast<unsigned char>(v & 0xFF);
    dst[n + i] = static_cast<unsigned char>(v >> 8);
  }
}

__global__ void unshuffle2_kernel(const unsigned char* __restrict__ src, unsigned short* __restrict__ dst,
                                  int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = static_cast<unsigned short>(src[i] | (static_cast<unsigned short>(src[n + i]) << 8));
  }
}

unsigned grid_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>((work + per_block - 1) / per_block, kMaxBlocks));
}

template <bool kScatter>
int rows_launch(const int64_t* ptrs, int64_t num_bufs, int64_t row_bytes, const int64_t* slots,
                int64_t num_slots, const void* flat, void* stream) {
  if (num_bufs < 0 || row_bytes < 0 || num_slots < 0) return cudaErrorInvalidValue;
  const int64_t rows = num_bufs * num_slots;
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  if (ptrs == nullptr || slots == nullptr || flat == nullptr) return cudaErrorInvalidValue;
  rows_kernel<kScatter><<<grid_for(rows, kRowsPerBlock), kRowsPerBlock * kWarp, 0,
                          static_cast<cudaStream_t>(stream)>>>(
      ptrs, num_slots, row_bytes, slots, static_cast<char*>(const_cast<void*>(flat)), rows);
  return cudaGetLastError();
}

template <bool kInverse>
int shuffle_launch(const void* src, void* dst, int64_t nbytes, int64_t elem_size, void* stream) {
  if (nbytes < 0 || elem_size < 1 || nbytes % elem_size != 0) return cudaErrorInvalidValue;
  if (nbytes == 0) return cudaSuccess;
  if (src == nullptr || dst == nullptr) return cudaErrorInvalidValue;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t n = nbytes / elem_size;
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dst);
  const bool aligned2 = ((reinterpret_cast<uintptr_t>(kInverse ? dst : src)) & 1) == 0;
  if (elem_size == 2 && aligned2) {
    if (kInverse)
      unshuffle2_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
          in, reinterpret_cast<unsigned short*>(out), n);
    else
      shuffle2_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(
          reinterpret_cast<const unsigned short*>(in), out, n);
  } else if (kInverse) {
    byte_planes_kernel<true><<<grid_for(nbytes, kThreads), kThreads, 0, s>>>(in, out, n, elem_size, nbytes);
  } else {
    byte_planes_kernel<false><<<grid_for(nbytes, kThreads), kThreads, 0, s>>>(in, out, n, elem_size, nbytes);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" {

LMCSGL_API int lmcsgl_cuda_gather_rows(const int64_t* ptrs, int64_t num_bufs, int64_t row_bytes,
                                       const int64_t* slots, int64_t num_slots, void* out,
                                       void* stream) {
  return rows_launch<false>(ptrs, num_bufs, row_bytes, slots, num_slots, out, stream);
}

LMCSGL_API int lmcsgl_cuda_scatter_rows(const int64_t* ptrs, int64_t num_bufs, int64_t row_bytes,
                                        const int64_t* slots, int64_t num_slots, const void* src,
                                        void* stream) {
  return rows_launch<true>(ptrs, num_bufs, row_bytes, slots, num_slots, src, stream);
}

LMCSGL_API int lmcsgl_cuda_shuffle_bytes(const void* src, void* dst, int64_t nbytes,
                                         int64_t elem_size, void* stream) {
  return shuffle_launch<false>(src, dst, nbytes, elem_size, stream);
}

LMCSGL_API int lmcsgl_cuda_unshuffle_bytes(const void* src, void* dst, int64_t nbytes,
                                           int64_t elem_size, void* stream) {
  return shuffle_launch<true>(src, dst, nbytes, elem_size, stream);
}

LMCSGL_API int lmcsgl_cuda_check(void) {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, rows_kernel<false>);
}

LMCSGL_API const char* lmcsgl_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
