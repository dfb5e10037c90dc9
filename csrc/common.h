// Shared by every part of the CPU kernels: the problem as Python hands it over (keep in sync with
// lomix_kernels/cpu.py), dtype conversions, input loads, errors and thread count.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int TP = 64;  // pixels per tile
constexpr size_t ALIGN = 64;  // every tile row starts a cache line (TP floats = 4 lines): a vector load or
                              // store that straddles two lines costs two (ca. 2-3x on the whole kernel)

// std::vector storage aligned to ALIGN bytes (tile buffers, per-thread partials).
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U> AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return (T*)::operator new(n * sizeof(T), std::align_val_t(ALIGN)); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(ALIGN)); }
  template <class U> bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U> bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <class T>
using aligned_vector = std::vector<T, AlignedAllocator<T>>;

// ---- keep in sync with lomix_kernels/cpu.py ------------------------------------------------
enum Op : int32_t { OP_ORIG = 0, OP_ADD = 1, OP_MULT = 2, OP_CAT = 3, OP_AWF = 4 };
enum DType : int32_t { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum TargetKind : int32_t { TK_U8 = 0, TK_I16 = 1, TK_I32 = 2, TK_I64 = 3, TK_SOFT_F32 = 4 };
enum Err : int32_t { ERR_NONE = 0, ERR_CLASS = 1, ERR_LOGIT = 2, ERR_WEIGHT = 3, ERR_SOFT = 4 };

struct Problem {
  int64_t batch, classes, pixels;  // B, C, P (target pixels per sample)
  int32_t num_stages, num_maps, num_subsets;
  int32_t logit_dtype;             // DType
  int32_t target_kind;             // TargetKind
  int32_t sigmoid;                 // 0 softmax, 1 sigmoid
  int32_t q;                       // Dice exponent, 1 or 2
  int32_t has_ignore;
  int64_t ignore_index;
  int32_t num_labels;              // valid integer labels: C, or 2 for binary sigmoid (C = 1)
  int32_t num_threads;
  int32_t awf_block_diagonal;      // awf_v is block-diagonal (official): skip off-block gradients
  int32_t spatial_rank;            // 2 or 3
  int64_t out_size[3];             // target spatial size (D, H, W); 2D: D = 1
  const int64_t* stage_size;       // (L, 3) native spatial size of each stage, same convention
  const void* const* logits;       // L pointers, (B, C, native pixels of stage i)
  const void* target;              // (B, P) integers or (B, C, P) float32
  const float* pixel_weight;       // (B, P) or null
  const int32_t* map_op;           // (M,) Op
  const int32_t* map_arg;          // (M,) stage index for OP_ORIG, subset index otherwise
  const int32_t* subset_size;      // (S,)
  const int32_t* subset_members;   // concatenated members, subset order
  const float* cat_w;              // packed per subset: (C, |S|C) then next subset
  const float* cat_b;              // packed per subset: (C,)
  const float* awf_v;              // packed per subset: (|S|, |S|C)
  const float* awf_c;              // packed per subset: (|S|,)
};
inline size_t logit_bytes(const Problem& pr) { return pr.logit_dtype == DT_F32 ? 4 : 2; }  // per logit (and gradient)
// ---------------------------------------------------------------------------------------------

// ---- scalar conversions (branch-free, vectorizable) -----------------------------------------
inline float f_from_bits(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
inline uint32_t bits_from_f(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

inline float half_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? bits_from_f(denormalized) : bits_from_f(normalized));
  return f_from_bits(r);
}
inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_f(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : exp_bits + mantissa_bits));
}
inline float bf16_to_float(uint16_t h) { return f_from_bits((uint32_t)h << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t u = bits_from_f(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);                      // round to nearest even
  return (uint16_t)(u >> 16);
}

struct ItemError { int32_t code = ERR_NONE; int64_t value = 0; };

template <typename T>
inline void load_labels(const T* src, int n, int64_t* dst) {
  for (int p = 0; p < n; ++p) dst[p] = (int64_t)src[p];
}

// Load logits, target and pixel weights of tile [p0, p0 + n) of sample b into `tl`.
// Pads the tail with zeros (w = 0). Reports the first bad value in `err` when `check`.
inline float load_one(int32_t dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DT_F32: return ((const float*)base)[i];
    case DT_F16: return half_to_float(((const uint16_t*)base)[i]);
    default:     return bf16_to_float(((const uint16_t*)base)[i]);
  }
}

// Denormal floats flushed to zero (FTZ and DAZ) in this thread while in scope: the add maps' products
// of exponentials underflow for confident pixels, and x86 cores take a slow microcode path for every
// denormal result. What is flushed is below 1.2e-38, beyond every tolerance of the sums it enters.
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Ask for transparent huge pages on the 2 MB-aligned inside of [p, p + bytes): a fresh output buffer
// (the logits' gradients, allocated per step) then takes its first-touch page faults per 2 MB, not
// per 4 KB (10 k faults for synapse2d's 43 MB, ~10 ms). Only a hint (no-op where THP is off); the
// contents are untouched.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
  if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

int num_threads(const Problem& pr) {
#ifdef _OPENMP
  return pr.num_threads > 0 ? pr.num_threads : omp_get_max_threads();
#else
  (void)pr;
  return 1;
#endif
}

int first_error(const std::vector<ItemError>& errs, int64_t* err_value) {
  for (const ItemError& e : errs)
    if (e.code != ERR_NONE) { *err_value = e.value; return e.code; }
  return ERR_NONE;
}

}  // namespace
