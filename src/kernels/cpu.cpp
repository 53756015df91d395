// CPU KV-layout kernels and RoPE re-rotation (see lmcsgl.h for the contracts).
#include "lmcsgl.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

constexpr int64_t kSerialBytes = int64_t(8) << 20;     // below this a call runs serially (measured:
                                                       // a 2 MiB scatter is faster on one thread
                                                       // than paying two thread start-ups)
constexpr int64_t kMinBytesPerThread = int64_t(1) << 18;
constexpr int64_t kStreamBytes = int64_t(4) << 20;     // calls this large bypass the cache
// Short segments (below kLongSegment) are copied kGroup at a time in lockstep; longer ones
// alone. Measured on SGLang's pool, whose K and V halves share one allocation per layer so
// that every layer's rows sit at one page offset: 8 long streams in lockstep ran at a third
// of memcpy (probably one L1 set for all 8; not checked with counters), one at a time at
// memcpy; 4 short rows in lockstep beat 8.
constexpr int kGroup = 4;
constexpr int64_t kLongSegment = int64_t(4) << 10;

int max_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("LMCACHE_SGL_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int>(hw) : 1;
  }();
  return n;
}

// How many threads a call moving `bytes` over `units` work items should use.
int64_t plan_threads(int64_t units, int64_t bytes) {
  if (bytes < kSerialBytes) return 1;
  return std::max<int64_t>(1, std::min<int64_t>({max_threads(), units, bytes / kMinBytesPerThread}));
}

// fn(lo, hi) over [0, units) cut into `nt` contiguous ranges; the calling thread takes the
// first. Ranges whose thread cannot be started run on the calling thread. fn must not throw.
template <class Fn>
void parallel_for(int64_t units, int64_t nt, const Fn& fn) {
  if (nt <= 1) {
    fn(int64_t(0), units);
    return;
  }
  std::vector<std::thread> workers;
  int64_t spawned = 1;
  try {
    workers.reserve(static_cast<size_t>(nt - 1));
    for (; spawned < nt; ++spawned)
      workers.emplace_back(fn, units * spawned / nt, units * (spawned + 1) / nt);
  } catch (...) {  // no memory or no thread: the rest runs here
  }
  fn(int64_t(0), units / nt);
  for (int64_t t = spawned; t < nt; ++t) fn(units * t / nt, units * (t + 1) / nt);
  for (auto& w : workers) w.join();
}

bool valid_rows(int64_t num_bufs, int64_t row_bytes, int64_t num_slots) {
  if (num_bufs < 0 || row_bytes < 0 || num_slots < 0) return false;
  int64_t rows = 0, bytes = 0;
  return !__builtin_mul_overflow(num_bufs, num_slots, &rows) &&
         !__builtin_mul_overflow(rows, row_bytes, &bytes);
}

// True if any slot value occurs twice. Sorted input (the common case) costs one pass.
bool has_repeats(const int64_t* slots, int64_t n) {
  bool increasing = true;
  for (int64_t i = 1; i < n && increasing; ++i) increasing = slots[i] > slots[i - 1];
  if (increasing) return false;
  std::unique_ptr<int64_t[]> sorted(new int64_t[static_cast<size_t>(n)]);
  std::copy(slots, slots + n, sorted.get());
  std::sort(sorted.get(), sorted.get() + n);
  return std::adjacent_find(sorted.get(), sorted.get() + n) != sorted.get() + n;
}

// One gather/scatter call: B pool buffers of rows, N slots, the flat [B, N, row] buffer.
struct RowJob {
  const void* const* bufs;
  int64_t row_bytes;
  const int64_t* slots;
  int64_t num_slots;
  char* flat;
  int64_t flat_rows;  // rows between buffers in `flat`: row (b, n) is at flat + (b * flat_rows + n) * row_bytes
  bool merge_runs;    // copy consecutive slots of one buffer as one segment
};

struct Segment {
  char* dst;
  const char* src;
  int64_t len;
};

#if defined(__SSE2__)
template <bool kNT>
inline void store16(char* d, __m128i v) {
  if (kNT) _mm_stream_si128(reinterpret_cast<__m128i*>(d), v);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(d), v);
}
inline __m128i load16(const char* s) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)); }
#endif

// Copies k <= kGroup segments one 64-byte line of each in turn: the k independent streams
// overlap their cache misses, which a memcpy of one scattered row after another does not
// (about 2x faster from DRAM). Segments whose destinations coincide line up offset by offset,
// so the later one still wins. kNT: non-temporal stores to 16-byte aligned destinations.
template <bool kNT>
void copy_group(const Segment* seg, int k, bool vec16) {
#if defined(__SSE2__)
  if (vec16) {  // every len and dst is a multiple of 16
    int64_t longest = 0;
    for (int j = 0; j < k; ++j) longest = std::max(longest, seg[j].len);
    for (int64_t off = 0; off < longest; off += 64) {
      for (int j = 0; j < k; ++j) {
        const char* s = seg[j].src + off;
        char* d = seg[j].dst + off;
        const int64_t left = seg[j].len - off;
        if (left >= 64) {
          const __m128i v0 = load16(s), v1 = load16(s + 16), v2 = load16(s + 32), v3 = load16(s + 48);
          store16<kNT>(d, v0);
          store16<kNT>(d + 16, v1);
          store16<kNT>(d + 32, v2);
          store16<kNT>(d + 48, v3);
        } else {
          for (int64_t o = 0; o < left; o += 16) store16<kNT>(d + o, load16(s + o));
        }
      }
    }
    return;
  }
#else
  (void)vec16;
#endif
  for (int j = 0; j < k; ++j) std::memcpy(seg[j].dst, seg[j].src, static_cast<size_t>(seg[j].len));
}

// Rows [lo, hi) of the flattened (b, n) order, in that order: gather copies pool -> flat,
// scatter flat -> pool.
template <bool kScatter, bool kNT>
void move_rows(const RowJob& job, int64_t lo, int64_t hi) {
  const int64_t rb = job.row_bytes, num_slots = job.num_slots;
  Segment seg[kGroup];
  int64_t b = lo / num_slots, n = lo % num_slots;
  const bool vec16 = rb % 16 == 0;
  int k = 0;
  for (int64_t r = lo; r < hi;) {
    char* pool = static_cast<char*>(const_cast<void*>(job.bufs[b])) + job.slots[n] * rb;
    char* flat = job.flat + (b * job.flat_rows + n) * rb;
    int64_t len = 0;
    do {
      len += rb, ++r;
      if (++n == num_slots) n = 0, ++b;
    } while (job.merge_runs && r < hi && n != 0 && job.slots[n] == job.slots[n - 1] + 1);
    seg[k++] = kScatter ? Segment{pool, flat, len} : Segment{flat, pool, len};
    if (len >= kLongSegment) {  // the pending short ones first: segments are copied in order
      copy_group<kNT>(seg, k - 1, vec16);
      copy_group<kNT>(&seg[k - 1], 1, vec16);
      k = 0;
    } else if (k == kGroup) {
      copy_group<kNT>(seg, k, vec16);
      k = 0;
    }
  }
  copy_group<kNT>(seg, k, vec16);
#if defined(__SSE2__)
  if (kNT) _mm_sfence();
#endif
}

template <bool kScatter>
void move_rows_any(const RowJob& job, bool nt, int64_t lo, int64_t hi) {
  if (nt) move_rows<kScatter, true>(job, lo, hi);
  else move_rows<kScatter, false>(job, lo, hi);
}

// Non-temporal stores pay off for large calls and need 16-byte aligned destination rows.
bool use_streaming(const void* const* dst_bases, int64_t num, int64_t row_bytes, int64_t bytes) {
#if defined(__SSE2__)
  if (bytes < kStreamBytes || row_bytes % 16 != 0) return false;
  for (int64_t i = 0; i < num; ++i)
    if (reinterpret_cast<uintptr_t>(dst_bases[i]) % 16 != 0) return false;
  return true;
#else
  (void)dst_bases, (void)num, (void)row_bytes, (void)bytes;
  return false;
#endif
}

// Elements [lo, hi) of a 2-byte shuffle over n elements.
void shuffle2(const uint8_t* src, uint8_t* dst, int64_t n, int64_t lo, int64_t hi) {
  uint8_t* plane0 = dst;
  uint8_t* plane1 = dst + n;
  int64_t i = lo;
#if defined(__SSE2__)
  const __m128i low_mask = _mm_set1_epi16(0x00FF);
  for (; i + 16 <= hi; i += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i + 16));
    const __m128i lo8 = _mm_packus_epi16(_mm_and_si128(a, low_mask), _mm_and_si128(b, low_mask));
    const __m128i hi8 = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(plane0 + i), lo8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(plane1 + i), hi8);
  }
#endif
  for (; i < hi; ++i) {
    plane0[i] = src[2 * i];
    plane1[i] = src[2 * i + 1];
  }
}

// kNT: non-temporal stores, for a 16-byte aligned dst that is read later, from memory.
template <bool kNT = false>
void unshuffle2(const uint8_t* src, uint8_t* dst, int64_t n, int64_t lo, int64_t hi) {
  const uint8_t* plane0 = src;
  const uint8_t* plane1 = src + n;
  int64_t i = lo;
#if defined(__SSE2__)
  for (; i + 16 <= hi; i += 16) {
    const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(plane0 + i));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(plane1 + i));
    store16<kNT>(reinterpret_cast<char*>(dst + 2 * i), _mm_unpacklo_epi8(l, h));
    store16<kNT>(reinterpret_cast<char*>(dst + 2 * i + 16), _mm_unpackhi_epi8(l, h));
  }
  if (kNT) _mm_sfence();
#endif
  for (; i < hi; ++i) {
    dst[2 * i] = plane0[i];
    dst[2 * i + 1] = plane1[i];
  }
}

// Generic element sizes: a plain loop (ES > 0 fixes the size at compile time).
template <int ES>
void shuffle_n(const uint8_t* src, uint8_t* dst, int64_t n, int64_t es, int64_t lo, int64_t hi) {
  const int64_t e = ES > 0 ? ES : es;
  for (int64_t i = lo; i < hi; ++i)
    for (int64_t j = 0; j < e; ++j) dst[j * n + i] = src[i * e + j];
}

template <int ES>
void unshuffle_n(const uint8_t* src, uint8_t* dst, int64_t n, int64_t es, int64_t lo, int64_t hi) {
  const int64_t e = ES > 0 ? ES : es;
  for (int64_t i = lo; i < hi; ++i)
    for (int64_t j = 0; j < e; ++j) dst[i * e + j] = src[j * n + i];
}

template <bool kInverse>
int shuffle_impl(const void* src, void* dst, int64_t nbytes, int64_t elem_size) {
  if (nbytes < 0 || elem_size < 1 || nbytes % elem_size != 0) return LMCSGL_ERR_INVALID;
  if (nbytes == 0) return LMCSGL_OK;
  if (src == nullptr || dst == nullptr) return LMCSGL_ERR_INVALID;
  const auto* s = static_cast<const uint8_t*>(src);
  auto* d = static_cast<uint8_t*>(dst);
  const int64_t n = nbytes / elem_size;
  using Body = void (*)(const uint8_t*, uint8_t*, int64_t, int64_t, int64_t, int64_t);
  Body body;
  switch (elem_size) {
    case 1: body = kInverse ? unshuffle_n<1> : shuffle_n<1>; break;
    case 4: body = kInverse ? unshuffle_n<4> : shuffle_n<4>; break;
    case 8: body = kInverse ? unshuffle_n<8> : shuffle_n<8>; break;
    default: body = kInverse ? unshuffle_n<0> : shuffle_n<0>; break;
  }
  if (elem_size == 2) {
    parallel_for(n, plan_threads(n, nbytes), [&](int64_t lo, int64_t hi) {
      if (kInverse) unshuffle2(s, d, n, lo, hi); else shuffle2(s, d, n, lo, hi);
    });
  } else {
    parallel_for(n, plan_threads(n, nbytes),
                 [&](int64_t lo, int64_t hi) { body(s, d, n, elem_size, lo, hi); });
  }
  return LMCSGL_OK;
}

// Reads len bytes at file offset `offset` into dst: LMCSGL_OK, ERR_IO (*err: errno) or ERR_SHORT.
int pread_exact(int fd, char* dst, int64_t len, int64_t offset, int64_t* err) {
  for (int64_t got = 0; got < len;) {
    const ssize_t n = pread(fd, dst + got, static_cast<size_t>(len - got), offset + got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return *err = errno, LMCSGL_ERR_IO;
    if (n == 0) return LMCSGL_ERR_SHORT;
    got += n;
  }
  return LMCSGL_OK;
}

// Raw blocks are read this much at a time straight into the chunk buffer and hashed there
// while the piece is still in the core's L2.
constexpr int64_t kRawPiece = int64_t(256) << 10;

// One block of lmcsgl_read_blocks; *err: the errno of ERR_IO.
int read_block(const lmcsgl_frame_blocks& f, int64_t i, char* out, void* state, void* ctx,
               char* stored, char* plain, int64_t* err) {
  const int64_t begin = i * f.block_bytes, len = std::min(f.block_bytes, f.raw_bytes - begin);
  const int64_t size = f.sizes[i];
  const int fd = static_cast<int>(f.fd);
  f.hash_reset(state);
  if (f.decode == nullptr) {
    if (size != len) return LMCSGL_ERR_INVALID;
    for (int64_t at = 0; at < len; at += kRawPiece) {
      const int64_t piece = std::min(kRawPiece, len - at);
      char* dst = out + begin + at;
      const int rc = pread_exact(fd, dst, piece, f.offsets[i] + at, err);
      if (rc != LMCSGL_OK) return rc;
      f.hash_update(state, dst, static_cast<size_t>(piece));
    }
    return f.hash_digest(state) == f.digests[i] ? LMCSGL_OK : LMCSGL_ERR_DIGEST;
  }
  const int rc = pread_exact(fd, stored, size, f.offsets[i], err);
  if (rc != LMCSGL_OK) return rc;
  f.hash_update(state, stored, static_cast<size_t>(size));
  if (f.hash_digest(state) != f.digests[i]) return LMCSGL_ERR_DIGEST;
  if (f.decode(ctx, plain, static_cast<size_t>(len), stored, static_cast<size_t>(size)) !=
      static_cast<size_t>(len))
    return LMCSGL_ERR_DECODE;
  char* dst = out + begin;
  if (f.elem_size == 2 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {  // bf16/fp16: the common case
    unshuffle2<true>(reinterpret_cast<const uint8_t*>(plain), reinterpret_cast<uint8_t*>(dst), len / 2, 0, len / 2);
    return LMCSGL_OK;
  }
  return shuffle_impl<true>(plain, dst, len, f.elem_size);  // one thread: a frame's blocks are < kSerialBytes
}

// RoPE element types: load() widens to fp32 exactly, store() rounds to nearest even.
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// v >> s (1 <= s <= 31) rounded to nearest, ties to even.
inline uint32_t shift_rne(uint32_t v, uint32_t s) {
  const uint32_t q = v >> s, r = v & ((1u << s) - 1), half = 1u << (s - 1);
  return q + (r > half || (r == half && (q & 1)));
}

struct Fp32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
};

struct Bf16 {
  using T = uint16_t;
  static float load(T v) { return bits_f32(uint32_t(v) << 16); }
  static T store(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return T((u >> 16) | 0x40);  // NaN: quieted, sign kept
    return T(shift_rne(u, 16));  // a carry out of the top exponent gives infinity, as it should
  }
};

struct Fp16 {
  using T = uint16_t;
  static float load(T h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));  // infinity, NaN
    if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
    const float mag = float(mant) * 0x1p-24f;  // zero or subnormal: exact
    return sign ? -mag : mag;
  }
  static T store(float f) {
    const uint32_t u = f32_bits(f), a = u & 0x7fffffffu;
    const T sign = T((u >> 16) & 0x8000);
    if (a > 0x7f800000u) return T(sign | 0x7e00 | ((a >> 13) & 0x3ff));  // NaN: quieted
    if (a >= 0x477ff000u) return T(sign | 0x7c00);  // |f| >= 65520 rounds to infinity
    if (a >= 0x38800000u) return T(sign | shift_rne(a - 0x38000000u, 13));  // normal: rebias
    const uint32_t e = a >> 23;  // a subnormal half: the significand over 2^-24, rounded
    if (e < 102) return sign;    // |f| < 2^-25
    return T(sign | shift_rne((a & 0x7fffffu) | 0x800000u, 126 - e));
  }
};

// Rows [lo, hi). Every product, sum and difference is rounded on its own: this file is
// compiled with -ffp-contract=off (CMakeLists.txt), so no FMA joins them.
template <class E, bool kNeox>
void rope_rows(typename E::T* x, int64_t head_dim, int64_t half, const float* c, const float* s,
               int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    typename E::T* v = x + r * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      typename E::T& ea = v[kNeox ? i : 2 * i];
      typename E::T& eb = v[kNeox ? i + half : 2 * i + 1];
      const float a = E::load(ea), b = E::load(eb);
      ea = E::store(a * c[i] - b * s[i]);
      eb = E::store(b * c[i] + a * s[i]);
    }
  }
}

template <class E>
void rope_impl(void* x, int64_t rows, int64_t head_dim, int64_t rotary_dim, const float* c,
               const float* s, bool neox, int64_t bytes) {
  auto* t = static_cast<typename E::T*>(x);
  const int64_t half = rotary_dim / 2;
  parallel_for(rows, plan_threads(rows, bytes), [&](int64_t lo, int64_t hi) {
    if (neox) rope_rows<E, true>(t, head_dim, half, c, s, lo, hi);
    else rope_rows<E, false>(t, head_dim, half, c, s, lo, hi);
  });
}

}  // namespace

extern "C" {

LMCSGL_API int lmcsgl_gather_rows(const void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                  const int64_t* slots, int64_t num_slots, void* out) {
  if (!valid_rows(num_bufs, row_bytes, num_slots)) return LMCSGL_ERR_INVALID;
  const int64_t rows = num_bufs * num_slots;
  if (rows == 0 || row_bytes == 0) return LMCSGL_OK;
  if (bufs == nullptr || slots == nullptr || out == nullptr) return LMCSGL_ERR_INVALID;
  const int64_t bytes = rows * row_bytes;
  const void* const flat_base[1] = {out};
  const bool nt = use_streaming(flat_base, 1, row_bytes, bytes);
  const RowJob job{bufs, row_bytes, slots, num_slots, static_cast<char*>(out), num_slots, true};
  // Flattened (b, n) rows: each thread writes one contiguous range of `out`.
  parallel_for(rows, plan_threads(rows, bytes),
               [&](int64_t lo, int64_t hi) { move_rows_any<false>(job, nt, lo, hi); });
  return LMCSGL_OK;
}

LMCSGL_API int lmcsgl_scatter_rows(void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                   const int64_t* slots, int64_t num_slots, const void* src) {
  if (!valid_rows(num_bufs, row_bytes, num_slots)) return LMCSGL_ERR_INVALID;
  const int64_t rows = num_bufs * num_slots;
  if (rows == 0 || row_bytes == 0) return LMCSGL_OK;
  if (bufs == nullptr || slots == nullptr || src == nullptr) return LMCSGL_ERR_INVALID;
  const int64_t bytes = rows * row_bytes;
  const bool nt = use_streaming(bufs, num_bufs, row_bytes, bytes);
  bool repeats = false;
  try {
    repeats = has_repeats(slots, num_slots);
  } catch (const std::bad_alloc&) {
    return LMCSGL_ERR_NOMEM;
  }
  // Repeated slots: rows are not merged into runs (that could reorder two writes of one
  // slot) and each thread owns whole buffers, so within a buffer the rows go in n order
  // and the last occurrence wins, exactly as in a serial loop.
  const RowJob job{bufs, row_bytes, slots, num_slots,
                   static_cast<char*>(const_cast<void*>(src)), num_slots, !repeats};
  const int64_t unit = repeats ? num_slots : 1;
  parallel_for(rows / unit, plan_threads(rows / unit, bytes), [&](int64_t lo, int64_t hi) {
    move_rows_any<true>(job, nt, lo * unit, hi * unit);
  });
  return LMCSGL_OK;
}

LMCSGL_API int lmcsgl_scatter_rows_batch(void* const* bufs, int64_t num_bufs, int64_t row_bytes,
                                         const int64_t* slots, const int64_t* offsets,
                                         int64_t num_pieces, const void* const* srcs,
                                         const int64_t* src_rows) {
  if (num_pieces < 0 || (num_pieces > 0 && (offsets == nullptr || offsets[0] != 0)))
    return LMCSGL_ERR_INVALID;
  for (int64_t p = 0; p < num_pieces; ++p)
    if (offsets[p + 1] < offsets[p] || (src_rows != nullptr && src_rows[p] < offsets[p + 1] - offsets[p]))
      return LMCSGL_ERR_INVALID;
  const int64_t num_slots = num_pieces > 0 ? offsets[num_pieces] : 0;
  if (!valid_rows(num_bufs, row_bytes, num_slots)) return LMCSGL_ERR_INVALID;
  if (num_bufs == 0 || num_slots == 0 || row_bytes == 0) return LMCSGL_OK;
  if (bufs == nullptr || slots == nullptr || srcs == nullptr) return LMCSGL_ERR_INVALID;
  for (int64_t p = 0; p < num_pieces; ++p)
    if (srcs[p] == nullptr && offsets[p + 1] > offsets[p]) return LMCSGL_ERR_INVALID;
  try {
    if (has_repeats(slots, num_slots)) return LMCSGL_ERR_INVALID;
  } catch (const std::bad_alloc&) {
    return LMCSGL_ERR_NOMEM;
  }
  const int64_t bytes = num_bufs * num_slots * row_bytes;
  const bool nt = use_streaming(bufs, num_bufs, row_bytes, bytes);
  // The rows of all pieces, piece after piece, each in its (b, n) order; piece p's rows
  // are [num_bufs * offsets[p], num_bufs * offsets[p + 1]). Distinct slots: any order is right.
  parallel_for(num_bufs * num_slots, plan_threads(num_bufs * num_slots, bytes),
               [&](int64_t lo, int64_t hi) {
    for (int64_t p = 0; p < num_pieces && lo < hi; ++p) {
      const int64_t first = num_bufs * offsets[p], last = num_bufs * offsets[p + 1];
      if (last <= lo) continue;
      const int64_t n = offsets[p + 1] - offsets[p];
      const RowJob job{bufs, row_bytes, slots + offsets[p], n,
                       static_cast<char*>(const_cast<void*>(srcs[p])), src_rows ? src_rows[p] : n, true};
      const int64_t end = std::min(hi, last);
      move_rows_any<true>(job, nt, lo - first, end - first);
      lo = end;
    }
  });
  return LMCSGL_OK;
}

LMCSGL_API int lmcsgl_shuffle_bytes(const void* src, void* dst, int64_t nbytes, int64_t elem_size) {
  return shuffle_impl<false>(src, dst, nbytes, elem_size);
}

LMCSGL_API int lmcsgl_unshuffle_bytes(const void* src, void* dst, int64_t nbytes,
                                      int64_t elem_size) {
  return shuffle_impl<true>(src, dst, nbytes, elem_size);
}

LMCSGL_API int lmcsgl_read_blocks(const lmcsgl_frame_blocks* f, int64_t lo, int64_t hi, void* out,
                                  void* state, void* ctx, void* stored, void* plain, int64_t* detail) {
  if (f == nullptr || detail == nullptr || f->hash_reset == nullptr || f->hash_update == nullptr ||
      f->hash_digest == nullptr || f->block_bytes <= 0 || f->raw_bytes < 0)
    return LMCSGL_ERR_INVALID;
  const int64_t blocks = f->raw_bytes / f->block_bytes + (f->raw_bytes % f->block_bytes != 0);
  if (lo < 0 || lo > hi || hi > blocks ||
      (lo < hi && (out == nullptr || state == nullptr)) ||
      (f->decode != nullptr &&
       (stored == nullptr || plain == nullptr || f->elem_size < 1 || f->block_bytes % f->elem_size != 0)))
    return LMCSGL_ERR_INVALID;
  for (int64_t i = lo; i < hi; ++i) {
    int64_t err = 0;
    const int rc = read_block(*f, i, static_cast<char*>(out), state, ctx, static_cast<char*>(stored),
                              static_cast<char*>(plain), &err);
    if (rc != LMCSGL_OK) return *detail = rc == LMCSGL_ERR_IO ? err : i, rc;
  }
  return LMCSGL_OK;
}

LMCSGL_API int lmcsgl_rope_rotate(void* x, int64_t dtype, int64_t rows, int64_t head_dim,
                                  int64_t rotary_dim, const float* cos, const float* sin,
                                  int64_t neox) {
  const int64_t esize = dtype == LMCSGL_DTYPE_FP32 ? 4
                        : dtype == LMCSGL_DTYPE_FP16 || dtype == LMCSGL_DTYPE_BF16 ? 2
                                                                                   : 0;
  int64_t elems = 0, bytes = 0;
  if (esize == 0 || rows < 0 || head_dim < 0 || rotary_dim < 0 || rotary_dim % 2 != 0 ||
      rotary_dim > head_dim || __builtin_mul_overflow(rows, head_dim, &elems) ||
      __builtin_mul_overflow(elems, esize, &bytes))
    return LMCSGL_ERR_INVALID;
  if (rows == 0 || rotary_dim == 0) return LMCSGL_OK;
  if (x == nullptr || cos == nullptr || sin == nullptr) return LMCSGL_ERR_INVALID;
  if (dtype == LMCSGL_DTYPE_FP32) rope_impl<Fp32>(x, rows, head_dim, rotary_dim, cos, sin, neox, bytes);
  else if (dtype == LMCSGL_DTYPE_FP16) rope_impl<Fp16>(x, rows, head_dim, rotary_dim, cos, sin, neox, bytes);
  else rope_impl<Bf16>(x, rows, head_dim, rotary_dim, cos, sin, neox, bytes);
  return LMCSGL_OK;
}

}  // extern "C"
