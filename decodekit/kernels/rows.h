// decodekit's row kernels (AVX-512): y [M, N] = x [M, K] W^T for 1 to kMaxRows rows, one weight
// format each, over the weight rows n0 .. n1-1 (the caller splits them over threads). Included
// by cpu.cpp, which checks shapes and dtypes; nothing here allocates.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace decodekit_rows {

constexpr int64_t kGrain = 16;  // output rows per task at the least

inline __mmask16 mask16(int64_t left) { return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }
inline __mmask32 mask32(int64_t left) { return left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1); }
inline __mmask64 mask64(int64_t left) { return left >= 64 ? ~0ull : (__mmask64)((1ull << left) - 1); }

// With several rows of x a weight row takes long enough that the hardware prefetchers fall behind:
// the kernels for 2 or more rows ask for the weight kPrefetch bytes ahead (measured: w8a8 at 8 rows,
// GPT-2 124M's 48 projections, 9.6-10.2 ms without, 7.0-7.2 ms with, one thread). A single row
// streams fast enough without (software prefetches there were slower).
constexpr int64_t kPrefetch = 4096;

inline void ahead(const void* at, int64_t bytes) {  // the cache lines of [at, at + bytes), kPrefetch on
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)at + kPrefetch + b, _MM_HINT_T0);
}

// ------------------------------------------------------------------ float32
// Each kernel takes M rows of x (M <= kMaxRows, row stride K) against weight rows n0 .. n1-1 and
// writes y [M, N]; every x row has its own accumulators, summed in the same order for any M, so
// a row's result never depends on the others.
constexpr int kMaxRows = 8;

template <int M>
__attribute__((noinline)) void f32_rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0,
                                        int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
      const __m512 w0 = _mm512_loadu_ps(r + k), w1 = _mm512_loadu_ps(r + k + 16);
      ahead(r + k, 128);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, a[m]);
        b[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, b[m]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 t = mask16(K - k);
      const __m512 w0 = _mm512_maskz_loadu_ps(t, r + k);
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, x + m * K + k), w0, a[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
  }
}

// A column-major weight (wt = w.T, [K, N] contiguous): four rows of wt at a time added into y.
void f32_cm_columns(const float* x, const float* wt, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  std::fill(y + n0, y + n1, 0.f);
  for (int64_t k = 0; k < K; k += 4) {
    const int64_t kk = std::min<int64_t>(4, K - k);
    const __m512 x0 = _mm512_set1_ps(x[k]), x1 = _mm512_set1_ps(kk > 1 ? x[k + 1] : 0.f);
    const __m512 x2 = _mm512_set1_ps(kk > 2 ? x[k + 2] : 0.f), x3 = _mm512_set1_ps(kk > 3 ? x[k + 3] : 0.f);
    const float* w0 = wt + k * N;
    const float* w1 = kk > 1 ? w0 + N : w0;  // a missing row is multiplied by zero
    const float* w2 = kk > 2 ? w1 + N : w0;
    const float* w3 = kk > 3 ? w2 + N : w0;
    for (int64_t n = n0; n < n1; n += 16) {
      const __mmask16 m = mask16(n1 - n);
      __m512 a = _mm512_maskz_loadu_ps(m, y + n);
      __m512 b = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, w1 + n));
      a = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(m, w0 + n), a);
      b = _mm512_fmadd_ps(x3, _mm512_maskz_loadu_ps(m, w3 + n), b);
      a = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(m, w2 + n), a);
      _mm512_mask_storeu_ps(y + n, m, _mm512_add_ps(a, b));
    }
  }
}

// ------------------------------------------------------------------ bfloat16
template <int M>
__attribute__((target("avx512bf16"), noinline)) void bf16_rows(const uint16_t* xb, const uint16_t* w, float* y,
                                                               int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(r + k), w1 = (__m512bh)_mm512_loadu_si512(r + k + 32);
      ahead(r + k, 128);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_loadu_si512(xb + m * K + k), w0);
        b[m] = _mm512_dpbf16_ps(b[m], (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32), w1);
      }
    }
    for (; k < K; k += 32) {
      const __mmask32 t = mask32(K - k);
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(t, r + k);
      for (int m = 0; m < M; ++m)
        a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_maskz_loadu_epi16(t, xb + m * K + k), w0);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
  }
}

// ------------------------------------------------------------------ int8 weights, int16 input
// Each input row comes rounded to int16 with its own scale (cpu.cpp, quantize_row16); int16 x int8
// products summed exactly in integers (madd: pairs of products into int32 lanes), then scaled. The
// weight is widened to int16 (one instruction per 32 weights) where widening to float32 took two
// per 16 and bound the float32-input kernel at about half the memory bandwidth. A lane takes at most
// kChunk / 32 + 4 products (|q| <= 32767, |w| <= 127: within int32); longer rows add their chunks'
// sums in float32.
constexpr int64_t kChunk = 8192;

inline __m512i madd16(__m512i acc, __m512i x, __m512i w) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }

// a + b over all 32 int32 lanes, exact (in int64: the lanes' total may pass int32's range)
inline int64_t sum_lanes(__m512i a, __m512i b) {
  const __m512i lo = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a)),
                                      _mm512_cvtepi32_epi64(_mm512_castsi512_si256(b)));
  const __m512i hi = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1)),
                                      _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(b, 1)));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}

template <int M>
__attribute__((noinline)) void int8_rows(const int16_t* xq, const int8_t* w, const float* scale, const float* step,
                                         float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    float total[M] = {};
    for (int64_t c = 0; c < K; c += kChunk) {
      const int64_t end = std::min(K, c + kChunk), end64 = c + (end - c) / 64 * 64;
      __m512i a[M], b[M];
      for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_si512();
      int64_t k = c;
      for (; k < end64; k += 64) {
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r + k)));
        const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r + k + 32)));
        ahead(r + k, 64);
        for (int m = 0; m < M; ++m) {
          a[m] = madd16(a[m], _mm512_loadu_si512(xq + m * K + k), w0);
          b[m] = madd16(b[m], _mm512_loadu_si512(xq + m * K + k + 32), w1);
        }
      }
      for (; k < end; k += 32) {
        const __mmask32 t = mask32(end - k);
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(t, r + k));
        for (int m = 0; m < M; ++m) a[m] = madd16(a[m], _mm512_maskz_loadu_epi16(t, xq + m * K + k), w0);
      }
      for (int m = 0; m < M; ++m) total[m] += (float)sum_lanes(a[m], b[m]);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = total[m] * step[m] * scale[n];
  }
}

__attribute__((noinline)) void int8_row(const int16_t* xq, const int8_t* w, const float* scale, const float* step,
                                        float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    float total = 0.f;
    for (int64_t c = 0; c < K; c += kChunk) {
      const int64_t end = std::min(K, c + kChunk), end64 = c + (end - c) / 64 * 64;
      __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
      int64_t k = c;
      for (; k < end64; k += 64) {
        a = madd16(a, _mm512_loadu_si512(xq + k), _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r + k))));
        b = madd16(b, _mm512_loadu_si512(xq + k + 32), _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r + k + 32))));
      }
      for (; k < end; k += 32) {
        const __mmask32 t = mask32(end - k);
        a = madd16(a, _mm512_maskz_loadu_epi16(t, xq + k), _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(t, r + k)));
      }
      total += (float)sum_lanes(a, b);
    }
    y[n] = total * step[0] * scale[n];
  }
}

// ------------------------------------------------------------------ int8 x int8
// VNNI multiplies unsigned by signed bytes: with u = q + 128, <q, w> = <u, w> - 128 * sum(w).
template <int M>
__attribute__((target("avx512vnni"), noinline)) void w8a8_rows(const uint8_t* xu, const int8_t* w,
                                                               const int32_t* wsum, const float* scale,
                                                               const float* step, float* y, int64_t K, int64_t N,
                                                               int64_t n0, int64_t n1) {
  const int64_t K128 = K / 128 * 128;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m512i a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k < K128; k += 128) {
      const __m512i w0 = _mm512_loadu_si512(r + k), w1 = _mm512_loadu_si512(r + k + 64);
      ahead(r + k, 128);
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_dpbusd_epi32(a[m], _mm512_loadu_si512(xu + m * K + k), w0);
        b[m] = _mm512_dpbusd_epi32(b[m], _mm512_loadu_si512(xu + m * K + k + 64), w1);
      }
    }
    for (; k < K; k += 64) {  // zeroed lanes past K add nothing
      const __mmask64 t = mask64(K - k);
      const __m512i w0 = _mm512_maskz_loadu_epi8(t, r + k);
      for (int m = 0; m < M; ++m) a[m] = _mm512_dpbusd_epi32(a[m], _mm512_maskz_loadu_epi8(t, xu + m * K + k), w0);
    }
    for (int m = 0; m < M; ++m) {
      const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(a[m], b[m])) - 128 * wsum[n];
      y[m * N + n] = (float)dot * step[m] * scale[n];
    }
  }
}

__attribute__((target("avx512vnni"), noinline)) void w8a8_row(const uint8_t* xu, const int8_t* w, const int32_t* wsum,
                                                              const float* scale, const float* step, float* y,
                                                              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K128 = K / 128 * 128;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = w + n * K;
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k < K128; k += 128) {
      a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(xu + k), _mm512_loadu_si512(r + k));
      b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(xu + k + 64), _mm512_loadu_si512(r + k + 64));
    }
    for (; k < K; k += 64) {
      const __mmask64 t = mask64(K - k);
      a = _mm512_dpbusd_epi32(a, _mm512_maskz_loadu_epi8(t, xu + k), _mm512_maskz_loadu_epi8(t, r + k));
    }
    const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b)) - 128 * wsum[n];
    y[n] = (float)dot * step[0] * scale[n];
  }
}

__attribute__((noinline)) void f32_row(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0,
                                       int64_t n1) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
      a = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(r + k), a);
      b = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(r + k + 16), b);
    }
    for (; k < K; k += 16) {
      const __mmask16 t = mask16(K - k);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, x + k), _mm512_maskz_loadu_ps(t, r + k), a);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}

__attribute__((target("avx512bf16"), noinline)) void bf16_row(const uint16_t* xb, const uint16_t* w, float* y,
                                                              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(xb + k), (__m512bh)_mm512_loadu_si512(r + k));
      b = _mm512_dpbf16_ps(b, (__m512bh)_mm512_loadu_si512(xb + k + 32), (__m512bh)_mm512_loadu_si512(r + k + 32));
    }
    for (; k < K; k += 32) {
      const __mmask32 t = mask32(K - k);
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(t, xb + k), (__m512bh)_mm512_maskz_loadu_epi16(t, r + k));
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}

// one instantiation per row count (single rows: the loops above): the accumulators stay in registers
template <template <int> class Kernel, typename... Args>
void for_rows(int64_t M, Args... args) {
  switch (M) {
    case 1: Kernel<1>::run(args...); break;
    case 2: Kernel<2>::run(args...); break;
    case 3: Kernel<3>::run(args...); break;
    case 4: Kernel<4>::run(args...); break;
    case 5: Kernel<5>::run(args...); break;
    case 6: Kernel<6>::run(args...); break;
    case 7: Kernel<7>::run(args...); break;
    case 8: Kernel<8>::run(args...); break;
  }
}

template <int M> struct F32 { template <typename... A> static void run(A... a) { f32_rows<M>(a...); } };
template <> struct F32<1> { template <typename... A> static void run(A... a) { f32_row(a...); } };
template <int M> struct BF16 { template <typename... A> static void run(A... a) { bf16_rows<M>(a...); } };
template <> struct BF16<1> { template <typename... A> static void run(A... a) { bf16_row(a...); } };
template <int M> struct Int8 { template <typename... A> static void run(A... a) { int8_rows<M>(a...); } };
template <> struct Int8<1> { template <typename... A> static void run(A... a) { int8_row(a...); } };
template <int M> struct W8A8 { template <typename... A> static void run(A... a) { w8a8_rows<M>(a...); } };
template <> struct W8A8<1> { template <typename... A> static void run(A... a) { w8a8_row(a...); } };

}  // namespace decodekit_rows
