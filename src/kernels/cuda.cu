// CUDA KV-layout kernels and RoPE re-rotation (see lmcsgl.h for the contracts). Every call
// only enqueues work on the given stream and returns the launch status as a cudaError_t.
#include "lmcsgl.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

// RoPE element types: widened to fp32 exactly, rounded back to nearest even.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float f);
template <>
__device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float f) { return __float2half_rn(f); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }

// One thread per (row, pair); the _rn intrinsics round each operation on its own (no FMA).
template <typename T, bool kNeox>
__global__ void rope_kernel(T* __restrict__ x, int64_t head_dim, int64_t half,
                            const float* __restrict__ c, const float* __restrict__ s, int64_t pairs) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = p / half, i = p - r * half;
    T* v = x + r * head_dim;
    const int64_t ia = kNeox ? i : 2 * i, ib = kNeox ? i + half : 2 * i + 1;
    const float a = to_f32(v[ia]), b = to_f32(v[ib]);
    v[ia] = from_f32<T>(__fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, s[i])));
    v[ib] = from_f32<T>(__fadd_rn(__fmul_rn(b, c[i]), __fmul_rn(a, s[i])));
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

template <typename T>
void rope_launch(void* x, int64_t rows, int64_t head_dim, int64_t half, const float* c,
                 const float* s, bool neox, cudaStream_t stream) {
  const int64_t pairs = rows * half;
  auto* t = static_cast<T*>(x);
  if (neox) rope_kernel<T, true><<<grid_for(pairs, kThreads), kThreads, 0, stream>>>(t, head_dim, half, c, s, pairs);
  else rope_kernel<T, false><<<grid_for(pairs, kThreads), kThreads, 0, stream>>>(t, head_dim, half, c, s, pairs);
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

LMCSGL_API int lmcsgl_cuda_rope_rotate(void* x, int64_t dtype, int64_t rows, int64_t head_dim,
                                       int64_t rotary_dim, const float* cos, const float* sin,
                                       int64_t neox, void* stream) {
  const bool known = dtype == LMCSGL_DTYPE_FP32 || dtype == LMCSGL_DTYPE_FP16 || dtype == LMCSGL_DTYPE_BF16;
  int64_t elems = 0;
  if (!known || rows < 0 || head_dim < 0 || rotary_dim < 0 || rotary_dim % 2 != 0 ||
      rotary_dim > head_dim || __builtin_mul_overflow(rows, head_dim, &elems))
    return cudaErrorInvalidValue;
  if (rows == 0 || rotary_dim == 0) return cudaSuccess;
  if (x == nullptr || cos == nullptr || sin == nullptr) return cudaErrorInvalidValue;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t half = rotary_dim / 2;
  if (dtype == LMCSGL_DTYPE_FP32) rope_launch<float>(x, rows, head_dim, half, cos, sin, neox, s);
  else if (dtype == LMCSGL_DTYPE_FP16) rope_launch<__half>(x, rows, head_dim, half, cos, sin, neox, s);
  else rope_launch<__nv_bfloat16>(x, rows, head_dim, half, cos, sin, neox, s);
  return cudaGetLastError();
}

LMCSGL_API int lmcsgl_cuda_check(void) {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, rows_kernel<false>);
}

LMCSGL_API const char* lmcsgl_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
