// lmcache-sgl KV-layout kernels: a plain C ABI over raw pointers, loaded with ctypes
// from lmcache_sgl/ops.py (the only caller). No torch headers: the build is independent
// of torch's ABI and CUDA version.
//
// All functions return 0 on success. The CPU library returns LMCSGL_ERR_* codes; the CUDA
// library returns a cudaError_t (cudaErrorInvalidValue == 1 == LMCSGL_ERR_INVALID).
//
// Rows: a "pool" is B buffers, each an array of fixed-size rows (one row per KV slot:
// SGLang's per-layer k/v buffer [slots, kv_heads, head_dim], or MLA [slots, 1, dim]).
// A "flat" chunk buffer is contiguous [B, N, row_bytes]. Slots are NOT bounds-checked
// here (the caller checks 0 <= slot < pool size); buffers must not overlap each other or
// the flat buffer.
#pragma once
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define LMCSGL_API __declspec(dllexport)
#else
#define LMCSGL_API __attribute__((visibility("default")))
#endif

#define LMCSGL_OK 0
#define LMCSGL_ERR_INVALID 1  // bad argument (negative size, nbytes % elem_size != 0, ...)
#define LMCSGL_ERR_NOMEM 2    // host allocation failed
#define LMCSGL_ERR_IO 3       // lmcsgl_read_blocks: a read failed (*detail: its errno)
#define LMCSGL_ERR_SHORT 4    // lmcsgl_read_blocks: the file ends before a block does
#define LMCSGL_ERR_DIGEST 5   // lmcsgl_read_blocks: a block's digest differs (*detail: block)
#define LMCSGL_ERR_DECODE 6   // lmcsgl_read_blocks: a block does not decode to its size (*detail: block)

// Element types of lmcsgl_rope_rotate.
#define LMCSGL_DTYPE_FP32 0
#define LMCSGL_DTYPE_FP16 1
#define LMCSGL_DTYPE_BF16 2

#ifdef __cplusplus
extern "C" {
#endif

// ---- CPU (lmcache_sgl/_kernels_cpu.so) ----
// Threads: up to hardware_concurrency (or $LMCACHE_SGL_THREADS, read once); serial when
// the call moves less than 1 MiB.

// out[b, n, :] = bufs[b][slots[n] * row_bytes : +row_bytes]. Slots may repeat.
LMCSGL_API int lmcsgl_gather_rows(const void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                  const int64_t* slots, int64_t num_slots, void* out);

// bufs[b][slots[n]] = src[b, n, :]. With repeated slots the result equals sequential
// assignment in n order: the last occurrence wins.
LMCSGL_API int lmcsgl_scatter_rows(void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                   const int64_t* slots, int64_t num_slots, const void* src);

// Several scatters as one call, sharing its threads: piece p writes srcs[p], [B, n_p, row]
// rows, to slots[offsets[p] .. offsets[p + 1]) (offsets[0] == 0, non-decreasing). Within a
// buffer a piece's rows are consecutive; buffer b's first row is src_rows[p] * b rows after
// srcs[p] (src_rows[p] >= n_p; src_rows null: n_p, a flat piece), so a piece can be a slice
// of a longer chunk. Slots must be distinct over all pieces (LMCSGL_ERR_INVALID otherwise).
LMCSGL_API int lmcsgl_scatter_rows_batch(void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                         const int64_t* slots, const int64_t* offsets,
                                         int64_t num_pieces, const void* const* srcs,
                                         const int64_t* src_rows);

// Byte-plane shuffle, n = nbytes / elem_size: dst[j * n + i] = src[i * elem_size + j].
// nbytes must be a multiple of elem_size >= 1; src and dst must not overlap.
LMCSGL_API int lmcsgl_shuffle_bytes(const void* src, void* dst, int64_t nbytes, int64_t elem_size);
// Inverse: dst[i * elem_size + j] = src[j * n + i].
LMCSGL_API int lmcsgl_unshuffle_bytes(const void* src, void* dst, int64_t nbytes, int64_t elem_size);

// Reading a verified frame's blocks from a file (lmcache_sgl/codec.py's frame format). The
// library links no hash and no codec: the caller lends the functions it writes frames with.
// The digest of a block is computed incrementally: reset(state), update(state, ...) over its
// bytes in order, then digest(state) (XXH3-64's streaming functions on one state, which give
// its one-shot digest). decode: zstd's one-shot decoder (ZSTD_decompressDCtx: the bytes
// decoded into dst, or an error code, which is > cap).
typedef int (*lmcsgl_hash_reset_fn)(void* state);
typedef int (*lmcsgl_hash_update_fn)(void* state, const void* data, size_t len);
typedef uint64_t (*lmcsgl_hash_digest_fn)(const void* state);
typedef size_t (*lmcsgl_decode_fn)(void* ctx, void* dst, size_t cap, const void* src, size_t len);

typedef struct {
  int64_t fd;                // the open frame file
  int64_t block_bytes;       // block i holds chunk bytes [i * block_bytes, min((i + 1) * block_bytes, raw_bytes))
  int64_t raw_bytes;         // the chunk's bytes
  const int64_t* offsets;    // block i is stored as sizes[i] bytes at file offset offsets[i],
  const int64_t* sizes;
  const uint64_t* digests;   // whose digest is digests[i]
  lmcsgl_hash_reset_fn hash_reset;
  lmcsgl_hash_update_fn hash_update;
  lmcsgl_hash_digest_fn hash_digest;
  lmcsgl_decode_fn decode;   // null: raw blocks (the stored bytes are the chunk's bytes)
  int64_t elem_size;         // decoded blocks hold byte planes of this element size (lmcsgl_shuffle_bytes)
} lmcsgl_frame_blocks;

// Blocks [lo, hi) of frame f into the chunk buffer out (raw_bytes), on the calling thread,
// with this thread's hash `state` and, for zstd, its `ctx` and buffers `stored` (at least
// the largest sizes[i]) and `plain` (at least block_bytes; both may be null for raw blocks).
// A raw block (sizes[i] must be its length) is read a cache-sized piece at a time straight
// into out and hashed there; a zstd block is read into `stored`, checked, decoded into
// `plain` with decode(ctx, ...) and unshuffled into out. Returns 0, or an LMCSGL_ERR_*
// code (INVALID for a bad argument) with *detail naming the first failing block (ERR_IO:
// the errno); out's bytes are then unspecified.
LMCSGL_API int lmcsgl_read_blocks(const lmcsgl_frame_blocks* f, int64_t lo, int64_t hi, void* out,
                                  void* state, void* ctx, void* stored, void* plain, int64_t* detail);

// RoPE re-rotation in place: x is `rows` contiguous vectors of head_dim elements of `dtype`
// (LMCSGL_DTYPE_*). In each, the first rotary_dim elements (even, <= head_dim) form
// h = rotary_dim / 2 pairs (a, b) = (x[i], x[i + h]) when neox, else (x[2i], x[2i + 1]), and
// pair i is rotated by the angle whose cosine and sine are cos[i] and sin[i] (fp32, h each):
//   a' = a * cos - b * sin,  b' = b * cos + a * sin,
// in fp32 with every product, sum and difference rounded on its own (no FMA), then rounded
// to `dtype` to nearest even (a NaN stays a NaN; its payload may change). Elements past
// rotary_dim are untouched. The same pair math as torch's fp32 ops, bit for bit.
// LMCSGL_ERR_INVALID for an unknown dtype, a negative size, or an odd or too large rotary_dim.
LMCSGL_API int lmcsgl_rope_rotate(void* x, int64_t dtype, int64_t rows, int64_t head_dim,
                                  int64_t rotary_dim, const float* cos, const float* sin,
                                  int64_t neox);

// ---- CUDA (lmcache_sgl/_kernels_cuda.so) ----
// Same semantics on device memory, enqueued on `stream` (a cudaStream_t; asynchronous).
// `ptrs` is a DEVICE array of num_bufs int64 buffer addresses; slots is a device array.
// Scatter: slots must be distinct (the caller removes repeats, keeping the last).

LMCSGL_API int lmcsgl_cuda_gather_rows(const int64_t* ptrs, int64_t num_bufs, int64_t row_bytes,
                                       const int64_t* slots, int64_t num_slots, void* out,
                                       void* stream);
LMCSGL_API int lmcsgl_cuda_scatter_rows(const int64_t* ptrs, int64_t num_bufs, int64_t row_bytes,
                                        const int64_t* slots, int64_t num_slots, const void* src,
                                        void* stream);
LMCSGL_API int lmcsgl_cuda_shuffle_bytes(const void* src, void* dst, int64_t nbytes,
                                         int64_t elem_size, void* stream);
LMCSGL_API int lmcsgl_cuda_unshuffle_bytes(const void* src, void* dst, int64_t nbytes,
                                           int64_t elem_size, void* stream);
// x, cos and sin are device arrays.
LMCSGL_API int lmcsgl_cuda_rope_rotate(void* x, int64_t dtype, int64_t rows, int64_t head_dim,
                                       int64_t rotary_dim, const float* cos, const float* sin,
                                       int64_t neox, void* stream);
// 0 when the kernels can run on the current device (driver new enough, code for its arch).
LMCSGL_API int lmcsgl_cuda_check(void);
LMCSGL_API const char* lmcsgl_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
