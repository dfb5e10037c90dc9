// Vector math of the CPU kernels: exp/log polynomials, a tile row of TP floats in native-width
// vectors, and the horizontal reductions the statistics and parameter gradients use.
#pragma once

#include "common.h"

#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

// ---- exp / log with polynomial kernels, written so gcc vectorizes them -----------------------
// exp(x) = 2^n · exp(r), n = round(x / ln2), r = x − n·ln2 by one FMA (ln2 rounded to float: r is off
// by |n|·1.9e-9, a relative error of exp below 3e-8 for x ≥ −10 and below 2.5e-7 down to −87, where the
// values are ~1e-38), exp(r) for |r| ≤ ln2/2 by a degree-5 polynomial fitted for float32 relative
// error (≤ 1.7e-7; 5 FMAs by Horner). T is float or a vector of floats.
template <class T>
inline T exp_reduced(T x, T n) {
  const T r = x - n * 0.693147182f;
  T y = r * 8.29027221e-3f + 4.18981612e-2f;
  y = y * r + 1.66676387e-1f;
  y = y * r + 4.99991477e-1f;
  y = y * r + 9.99999702e-1f;
  return y * r + 1.0f;
}

// 2^r for r ∈ [0, 1]: a degree-5 polynomial fitted for float32 relative error (≤ 1.7e-7 by Horner in
// float32; exactly 1 at r = 0): the AVX-512 exponentials' (exp_nonpositive_v).
template <class T>
inline T exp2_unit(T r) {
  T y = r * 1.86713308e-3f + 9.01702233e-3f;
  y = y * r + 5.57999201e-2f;
  y = y * r + 2.40164444e-1f;
  y = y * r + 6.93151295e-1f;
  return y * r + 1.0f;
}

inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: round-to-nearest by addition
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const int32_t e = (int32_t)n + 127;
  return exp_reduced(x, n) * f_from_bits((uint32_t)e << 23);
}
inline float fast_log(float x) {  // x > 0, finite, normal
  const uint32_t u = bits_from_f(x);
  float e = (float)((int32_t)((u >> 23) & 0xFF) - 126);
  float m = f_from_bits((u & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}
inline float fast_log1p(float e) {  // e in [0, 1]: log(1 + e) without losing small e
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  return d == 0.0f ? e : fast_log(u) * (e / d);
}

// ---- a tile row of TP floats held in vector registers ----------------------------------------
// Vectors of the ISA's native width (VW lanes): generic vectors wider than the registers are
// lowered poorly (an AVX2 build of 16-lane vectors ran 5x slower than the AVX-512 one).
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
constexpr int NV = TP / VW;
static_assert(TP % VW == 0, "TP must be a multiple of the vector width");
template <int N>
struct Vecs { vf v[N]; };  // N pixel vectors held together (registers, where they fit)
using Row = Vecs<NV>;      // a whole tile row
// Ask for the cache line at p in L2 (a hint: nothing waits for it). The empty volatile asm is what keeps it:
// gcc 12 takes a function whose only effect is __builtin_prefetch for a pure one and deletes the calls to it,
// so until this helper the next tile's prefetch (interpolate.h) compiled to nothing (benchmarks/CPU_LOG.md).
inline void prefetch_l2(const void* p) {
  __builtin_prefetch(p, 0, 1);
  asm volatile("" : : "r"(p));
}
// max(a, b) per lane, a > b ? a : b (b where either is NaN): one vmaxps. By intrinsic: gcc lowers the
// conditional to vmaxps only for AVX-512 vectors — an AVX2 build made each a compare and a blend.
inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
  return (vf)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}
// a in every lane: one vbroadcastss (from memory where a is loaded). Not `vf{} + a`: gcc must keep that
// addition (+0 + −0 is +0): a scalar add, then a register broadcast on the shuffle port. a − 0 is a for
// every a, so the subtraction folds away.
inline vf splat(float a) { return a - vf{}; }
template <int N = NV>
inline Vecs<N> row_splat(float a) { Vecs<N> r; for (int i = 0; i < N; ++i) r.v[i] = splat(a); return r; }
template <int N = NV>
inline Vecs<N> row_load(const float* p) { Vecs<N> r; for (int i = 0; i < N; ++i) r.v[i] = *(const vf*)(p + VW * i); return r; }
template <int N>
inline void row_store(float* p, const Vecs<N>& r) { for (int i = 0; i < N; ++i) *(vf*)(p + VW * i) = r.v[i]; }
template <int N>
inline void row_fma(Vecs<N>& acc, float w, const float* x) {  // acc += w * x
  for (int i = 0; i < N; ++i) acc.v[i] += w * *(const vf*)(x + VW * i);
}
// exp(x) of VW lanes at once for x ≤ 0 (the softmax's shifted logits). With AVX-512, as 2^y, y = x·log2 e:
// r = y − floor(y) ∈ [0, 1) by one vreduceps, 2^r by exp2_unit, and the scale by 2^floor(y) by one
// vscalefps, which floors y itself, needs no clamp and underflows to 0 (x = −inf gives 0): 8 vector
// operations per VW exponentials, and exp(0) = 1 exactly (the max class of a softmax; an awf attention
// gradient that cancels to ~1e-6 of its terms needs it: tests/test_cpu.py's gap-120 case). y's rounding
// (2^-24 of |y|) is a relative error of the value below 6e-8·|x|: ≤ 2e-8 of the class sum. Otherwise
// fast_exp's method: n = round(x·log2 e) by adding and subtracting 1.5·2^23 + 127, r = x − n·ln2, 2^n from
// the sum's bits: 11 operations (a vmaxps clamp; FMA and subtraction for n, FMA for r, 5 polynomial
// FMAs, a shift and a multiplication for 2^n; 13 before, with a compare-and-blend clamp and the bias
// added after the shift).
inline vf exp_nonpositive_v(vf x) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)  // (vreduceps is AVX512DQ: in every x86-64-v4 CPU)
  const vf y = x * 1.44269504088896341f;
  const vf r = (vf)_mm512_reduce_ps((__m512)y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return (vf)_mm512_scalef_ps((__m512)exp2_unit(r), (__m512)y);
#else
  const vf shifter = vf{} + 12583039.0f;  // 1.5·2^23 + 127: round-to-nearest by addition, the bias added
  x = vmax(vf{} - 87.3f, x);  // (n ≥ −126: 2^n normal)
  const vf t = x * 1.44269504088896341f + shifter;  // t's low 9 mantissa bits hold n + 127 ∈ [1, 127]
  const vf n = t - shifter;
  typedef int32_t vi __attribute__((vector_size(VW * 4)));
  return exp_reduced(x, n) * (vf)((vi)t << 23);  // 2^n: n + 127 shifted into the exponent field
#endif
}

// log(x) of VW lanes for positive, finite, normal x (a softmax's class sum). x = m·2^e with m ∈ [0.75, 1.5)
// (exact): with AVX-512 by vgetmantps and e = getexp(x) − getexp(m); otherwise from the bits,
// e = (bits(x) − bits(0.75)) >> 23 (arithmetic shift: floor) and m = x with e taken off its exponent field.
// log m = 2·atanh(s), s = (m − 1)/(m + 1) ∈ [−1/7, 1/5] (m − 1 exact): 2s + 2s·w·(1/3 + w/5 + w²/7 + w³/9),
// w = s², truncated at 1e-8 relative; e·ln 2 in two parts. 16 vector operations with AVX-512, 17 with AVX2
// (one a division), where fast_log's auto-vectorized form issues ~26.
inline vf log_v(vf x) {
#if defined(__AVX512F__)
  const vf m = (vf)_mm512_getmant_ps((__m512)x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const vf e = (vf)_mm512_getexp_ps((__m512)x) - (vf)_mm512_getexp_ps((__m512)m);
#else
  typedef int32_t vi __attribute__((vector_size(VW * 4)));
  const vi k = ((vi)x - 0x3F400000) >> 23;  // (0x3F400000: the bits of 0.75)
  const vf m = (vf)((vi)x - (k << 23));
  const vf e = __builtin_convertvector(k, vf);
#endif
  const vf s = (m - 1.0f) / (m + 1.0f);
  const vf w = s * s;
  const vf q = ((w * 0.111111111111f + 0.142857142857f) * w + 0.2f) * w + 0.333333333333f;
  const vf s2 = s + s;
  const vf log_m = (s2 * w) * q + s2;
  return e * 0.693359375f + (e * -2.12194440e-4f + log_m);  // (ln 2 = 0.693359375 − 2.12194440e-4)
}

// 1/x of VW lanes for x ≥ 1e-20 (a softmax's class sum). With AVX-512: the 14-bit reciprocal estimate
// and one Newton step, r + r·(1 − x·r) (≤ 2 ulp, its bias ~4e-9: 3 vector operations where a 16-lane
// vdivps holds the divider for ~10 cycles). Otherwise a division: AVX2's 12-bit estimate leaves, after
// one step, a one-signed error of ~1e-7 that sums up in cancelling gradients (the awf bias: 6e-5).
inline vf reciprocal_v(vf x) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)x);
  return r + r * (1.0f - x * r);
#else
  return 1.0f / x;
#endif
}

// Pixel vectors of a tile processed side by side where a loop over the classes carries sums (adjoint.h; the
// softmax's class sums in stats.h, beside the exponential's ~9 constants): 4 (three registers each in
// adjoint.h, of 32 with AVX-512 and 16 with AVX2; AVX2's whole row, 8 sums, spilled in shifted_exps).
constexpr int PIXEL_GROUP = NV < 4 ? NV : 4;
static_assert(NV % PIXEL_GROUP == 0, "a tile's vectors split into whole pixel groups");

// Pixel vectors side by side when K rows of per-pixel weights stay in registers beside one sum per vector
// (the awf maps' attention weights, maps.h and adjoint.h): PIXEL_GROUP where (K + 1) groups leave two of the
// ISA's registers (32 with AVX-512, 16 otherwise) free, else halved until they do.
constexpr int VECTOR_REGISTERS = VW == 16 ? 32 : 16;
constexpr int weights_group(int K) {
  int n = PIXEL_GROUP;
  while (n > 1 && (K + 1) * n > VECTOR_REGISTERS - 2) n /= 2;
  return n;
}

// Pixel vectors per block of accumulators where whole rows would not fit the registers: a whole row with
// AVX-512 (4 of its 32 registers), half a row with AVX2 (a row is 8 of its 16).
constexpr int BLOCK_NV = NV <= 4 ? NV : 4;
// The 1x1-conv ("cat") loops in register blocks: CAT_BLOCK accumulator rows of BLOCK_NV pixel vectors, so
// each loaded vector feeds CAT_BLOCK rows. AVX-512: 4 whole rows (16 of its 32 registers). AVX2: 3 half
// rows (12 of its 16 registers; 2 whole rows, 16 registers, spilled: benchmarks/CPU_LOG.md).
constexpr int CAT_BLOCK = NV <= 4 ? 4 : 3;
// The cat weight gradient: DW_BLOCK g rows held together. AVX-512: 4 whole rows (16 registers), each x row
// loaded once for them. AVX2: 3 g rows × DW_XBLOCK x rows of sums (12 registers) over the tile's vectors,
// each loaded vector feeding 3 or 4 sums (a whole g row alone, 8 registers, made one 8-FMA chain per x row).
constexpr int DW_BLOCK = NV <= 4 ? 4 : 3;
constexpr int DW_XBLOCK = NV <= 4 ? 1 : 4;

// Calls f(std::integral_constant<int, NB>{}, c0) over blocks of NB = B consecutive rows that cover
// rows 0..C−1, the last block taking the remainder. With B = 4 (AVX-512) a remainder of one row joins
// the last full block (5 rows: 20 of the 32 registers): a 1-row block runs 4 dependent chains, too few
// to fill the FMA pipes (C = 9: 4 + 5 instead of 4 + 4 + 1); 2 or 3 left rows form their own block.
// Otherwise the C mod B rows left form one block.
template <int R, class F>
inline void remainder_block(int r, int c, F&& f) {  // f(std::integral_constant<int, r>{}, c) for 0 < r ≤ R
  if constexpr (R > 0) {
    if (r == R) return f(std::integral_constant<int, R>{}, c);
    remainder_block<R - 1>(r, c, f);
  }
}
template <int B, class F>
inline void for_row_blocks(int C, F&& f) {
  int c = 0;
  if constexpr (B == 4) {
    for (; c + 4 <= C; c += 4) {
      if (C - c == 5) {
        f(std::integral_constant<int, 5>{}, c);
        return;
      }
      f(std::integral_constant<int, 4>{}, c);
    }
    if (C - c == 3) return f(std::integral_constant<int, 3>{}, c);
    if (C - c == 2) return f(std::integral_constant<int, 2>{}, c);
    for (; c < C; ++c) f(std::integral_constant<int, 1>{}, c);
  } else {
    for (; c + B <= C; c += B) f(std::integral_constant<int, B>{}, c);
    remainder_block<B - 1>(C - c, c, f);
  }
}
template <int NB, int N>
inline void rows_fma(Vecs<N> (&acc)[NB], const float* w, int64_t w_stride, const float* x) {  // acc[b] += w[b·stride]·x
  const Vecs<N> xr = row_load<N>(x);
  for (int b = 0; b < NB; ++b) {
    const float wb = w[b * w_stride];
    for (int i = 0; i < N; ++i) acc[b].v[i] += wb * xr.v[i];
  }
}
template <int N>
inline void row_fma(Vecs<N>& acc, const float* a, const float* x) {  // acc += a ⊙ x
  for (int i = 0; i < N; ++i) acc.v[i] += *(const vf*)(a + VW * i) * *(const vf*)(x + VW * i);
}

// Parameter gradients: per tile, each is a dot product over the TP pixels, accumulated into one VW-lane
// partial per parameter (a per-thread buffer; no horizontal reduction per tile), folded into the item's
// double partials every FLUSH_TILES tiles, VW of them at a time (with AVX-512 by a transpose-and-add
// tree: 15 shuffles + adds for 16 sums instead of 16 horizontal reductions). The forward's per-map
// sums take the same route.
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < VW; ++l) s += v[l];
  return s;
}

#if defined(__AVX512F__)
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf reduce_lanes(vf a[16]) {  // lane i of the result = Σ lanes of a[i]
  const vi16 l1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi16 l1b = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi16 l2a = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi16 l2b = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vi16 l3a = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const vi16 l3b = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const vi16 l4a = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi16 l4b = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  vf u[8], w[4], y[2];
  for (int i = 0; i < 8; ++i) u[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], l1a) + __builtin_shuffle(a[2 * i], a[2 * i + 1], l1b);
  for (int i = 0; i < 4; ++i) w[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], l2a) + __builtin_shuffle(u[2 * i], u[2 * i + 1], l2b);
  for (int i = 0; i < 2; ++i) y[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], l3a) + __builtin_shuffle(w[2 * i], w[2 * i + 1], l3b);
  return __builtin_shuffle(y[0], y[1], l4a) + __builtin_shuffle(y[0], y[1], l4b);
}
#else
inline vf reduce_lanes(vf a[VW]) {  // lane i of the result = Σ lanes of a[i]
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = hsum(a[i]);
  return r;
}
#endif

inline vf row_dot(const Row& a, const float* b, vf r) {  // r + the per-lane partial of <a, b> over TP pixels
  for (int i = 0; i < NV; ++i) r += a.v[i] * *(const vf*)(b + VW * i);
  return r;
}

inline vf row_sum(const Row& a) {
  vf r = a.v[0];
  for (int i = 1; i < NV; ++i) r += a.v[i];
  return r;
}

// dst[e] += (the lanes of lanes[e] summed), then lanes[e] = 0, for e < n: VW partials reduced together by
// reduce_lanes (no per-element horizontal sum, a scalar chain of VW dependent adds).
inline void fold_lanes(double* dst, vf* lanes, size_t n) {
  for (size_t e0 = 0; e0 < n; e0 += VW) {
    const int nq = (int)std::min<size_t>(VW, n - e0);
    vf acc[VW];
    for (int q = 0; q < VW; ++q) acc[q] = q < nq ? lanes[e0 + q] : vf{};
    const vf sums = reduce_lanes(acc);
    for (int q = 0; q < nq; ++q) {
      dst[e0 + q] += sums[q];
      lanes[e0 + q] = vf{};
    }
  }
}

inline float sum_tp(const float* __restrict a) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int p = 0; p < TP; ++p) acc += a[p];
  return acc;
}

// ---- vectors of doubles at this build's width (DL = VW/2 lanes): the native heads' scatter --------
constexpr int DL = VW / 2;
typedef double vd __attribute__((vector_size(DL * 8), aligned(8)));
typedef int64_t vdmask __attribute__((vector_size(DL * 8)));
template <int K>
inline vd shift_up(vd x) {  // lanes moved up by K, zeros in
  vdmask m;
  for (int j = 0; j < DL; ++j) m[j] = j < K ? DL : j - K;
  return __builtin_shuffle(x, vd{}, m);
}

// Exclusive prefix sums of n doubles (n a multiple of DL): out[0] = 0, out[t + 1] = u[0] + … + u[t], by a
// log-step scan inside each vector and one carry between vectors.
inline void prefix_sums(const double* u, int n, double* out) {
  double carry = 0.0;
  out[0] = 0.0;
  for (int t0 = 0; t0 < n; t0 += DL) {
    vd x = *(const vd*)(u + t0);
    x += shift_up<1>(x);
    if constexpr (DL > 2) x += shift_up<2>(x);
    if constexpr (DL > 4) x += shift_up<4>(x);
    x += carry;
    *(vd*)(out + t0 + 1) = x;
    carry = x[DL - 1];
  }
}

// ---- streaming stores ----------------------------------------------------------------------------
// The backward writes each logits gradient once and never reads it back: ordinary stores would first
// read every line in (read-for-ownership) and push the tile buffers out of L1. Non-temporal stores do
// neither (synapse2d, gradient buffers reused: the original-maps-only backward 12.2 -> 5.7 ms). dst and
// src 64-byte aligned, bytes a multiple of 64 (can_stream); stream_fence() before the data is read.
inline bool can_stream(const void* dst, size_t bytes) { return (uintptr_t)dst % 64 == 0 && bytes % 64 == 0; }
inline void stream_lines(void* dst, const void* src, size_t bytes) {
#if defined(__AVX512F__)
  for (size_t o = 0; o < bytes; o += 64)
    _mm512_stream_si512((__m512i*)((char*)dst + o), _mm512_load_si512((const void*)((const char*)src + o)));
#elif defined(__AVX__)
  for (size_t o = 0; o < bytes; o += 32)
    _mm256_stream_si256((__m256i*)((char*)dst + o), _mm256_load_si256((const __m256i*)((const char*)src + o)));
#elif defined(__SSE2__)
  for (size_t o = 0; o < bytes; o += 16)
    _mm_stream_si128((__m128i*)((char*)dst + o), _mm_load_si128((const __m128i*)((const char*)src + o)));
#else
  std::memcpy(dst, src, bytes);
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace
