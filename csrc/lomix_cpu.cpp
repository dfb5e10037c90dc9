// Fused LoMix loss kernels for the CPU (SPEC §3-§5, §7).
//
// Plain C ABI (no torch headers): Python hands raw pointers through ctypes.
//
// Forward: each work item is a fixed band of whole output rows of one sample. It walks the band
// in tiles of TP pixels; per tile it loads all L stages once (converted to float32; coarser
// stages interpolated on the fly), builds every map in a small buffer, and accumulates the
// per-map per-class sums (CE, I, Z) plus the target sums.
// Backward: same walk; recomputes each map, forms dL/dz_u from the statistic gradients, pushes it
// through the operator into per-stage tile gradients (written once per tile, or scattered through
// the interpolation adjoint into per-item native-resolution buffers) and per-item parameter
// partials. Partials are reduced over items in a fixed order: results do not depend on the thread
// count or schedule (no float atomics).
//
// Layouts: logits[i] is (B, C, P_i) contiguous, P_i = native pixels per sample of stage i; pixels
// of one class are contiguous, so the innermost loops run over TP pixels and vectorize.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int TP = 64;  // pixels per tile

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

// ---- exp / log with polynomial kernels (Cephes), written so gcc vectorizes them -------------
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: round-to-nearest by addition
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t e = (int32_t)n + 127;
  return y * f_from_bits((uint32_t)e << 23);
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
struct Row { vf v[NV]; };
inline Row row_splat(float a) { Row r; for (int i = 0; i < NV; ++i) r.v[i] = vf{} + a; return r; }
inline Row row_load(const float* p) { Row r; for (int i = 0; i < NV; ++i) r.v[i] = *(const vf*)(p + VW * i); return r; }
inline void row_store(float* p, const Row& r) { for (int i = 0; i < NV; ++i) *(vf*)(p + VW * i) = r.v[i]; }
inline void row_fma(Row& acc, float w, const float* x) {  // acc += w * x
  for (int i = 0; i < NV; ++i) acc.v[i] += w * *(const vf*)(x + VW * i);
}
inline void row_fma(Row& acc, const float* a, const float* x) {  // acc += a ⊙ x
  for (int i = 0; i < NV; ++i) acc.v[i] += *(const vf*)(a + VW * i) * *(const vf*)(x + VW * i);
}

// ---- derived layout ---------------------------------------------------------------------------
struct Layout {
  int L, C, M, S;
  std::vector<int> sub_start;        // offset of each subset into subset_members
  std::vector<int64_t> cat_w_off, cat_b_off, awf_v_off, awf_c_off;
  int64_t cat_w_n = 0, cat_b_n = 0, awf_v_n = 0, awf_c_n = 0;
  int max_k = 1;
  explicit Layout(const Problem& p) : L(p.num_stages), C((int)p.classes), M(p.num_maps), S(p.num_subsets) {
    int start = 0;
    for (int j = 0; j < S; ++j) {
      const int k = p.subset_size[j];
      max_k = std::max(max_k, k);
      sub_start.push_back(start);
      start += k;
      cat_w_off.push_back(cat_w_n); cat_w_n += (int64_t)C * k * C;
      cat_b_off.push_back(cat_b_n); cat_b_n += C;
      awf_v_off.push_back(awf_v_n); awf_v_n += (int64_t)k * k * C;
      awf_c_off.push_back(awf_c_n); awf_c_n += k;
    }
  }
  int64_t num_params() const { return cat_w_n + cat_b_n + awf_v_n + awf_c_n; }
};

// ---- fused upsampling (bilinear / trilinear, align_corners=False, as F.interpolate) ----------
// Per stage and axis, for every output coordinate: the two source indices and their weights,
// computed exactly as PyTorch's CPU kernel does (float math, src = max(scale·(dst+0.5) − 0.5, 0)).
struct Axis { std::vector<int32_t> i0, i1; std::vector<float> l0, l1; };
struct Stage {
  bool resampled = false;
  int64_t size[3] = {1, 1, 1};
  int64_t pixels = 1;              // native pixels per sample
  Axis axis[3];
};
std::vector<Stage> make_stages(const Problem& pr) {
  std::vector<Stage> st(pr.num_stages);
  for (int i = 0; i < pr.num_stages; ++i) {
    Stage& S = st[i];
    S.pixels = 1;
    for (int a = 0; a < 3; ++a) {
      const int64_t in = pr.stage_size[3 * i + a], out = pr.out_size[a];
      S.size[a] = in;
      S.pixels *= in;
      S.resampled |= in != out;
      Axis& ax = S.axis[a];
      ax.i0.resize(out); ax.i1.resize(out); ax.l0.resize(out); ax.l1.resize(out);
      const float scale = (float)in / (float)out;
      for (int64_t o = 0; o < out; ++o) {
        if (in == out) { ax.i0[o] = ax.i1[o] = (int32_t)o; ax.l0[o] = 1.0f; ax.l1[o] = 0.0f; continue; }
        float src = scale * ((float)o + 0.5f) - 0.5f;
        src = src < 0.0f ? 0.0f : src;
        const int64_t j0 = (int64_t)src;
        const float l1 = std::min(std::max(src - (float)j0, 0.0f), 1.0f);
        ax.i0[o] = (int32_t)j0;
        ax.i1[o] = (int32_t)(j0 + (j0 < in - 1 ? 1 : 0));
        ax.l1[o] = l1;
        ax.l0[o] = 1.0f - l1;
      }
    }
  }
  return st;
}

// Work items: sample b and a band of whole output rows along the outermost spatial axis
// (D in 3D, H in 2D), pixel range [p0, p1). About ITEMS bands in all: few enough that per-item
// double partials stay small, enough to balance threads. Depends only on the shapes, so the
// reduction order (and every result bit) is independent of the thread count.
// A band touches native rows [i0(r0), i1(r1 - 1)] of each stage (for the backward's scatter).
constexpr int OUTER_2D = 1, OUTER_3D = 0;
constexpr int64_t ITEMS = 64;
constexpr int64_t FLUSH_TILES = 64;  // float lane partials are folded into double this often
struct Item { int64_t b, p0, p1, r0, r1; };
inline int outer_axis(const Problem& p) { return p.spatial_rank == 3 ? OUTER_3D : OUTER_2D; }
std::vector<Item> make_items(const Problem& p) {
  const int oa = outer_axis(p);
  const int64_t rows = p.out_size[oa];
  const int64_t row_px = p.pixels / rows;
  const int64_t per_sample = std::min(rows, std::max<int64_t>(1, (ITEMS + p.batch - 1) / p.batch));
  std::vector<Item> items;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t k = 0; k < per_sample; ++k) {
      const int64_t r0 = rows * k / per_sample, r1 = rows * (k + 1) / per_sample;
      if (r1 > r0) items.push_back({b, r0 * row_px, r1 * row_px, r0, r1});
    }
  return items;
}

// Per-thread tile buffers.
struct Tile {
  int L, C, n = 0;                 // n valid pixels in the current tile
  std::vector<float> x, t, z, s, g, gx, score, alpha, dalpha;
  float w[TP], lse[TP], inv[TP];  // softmax: tl.s holds exp(z - max); inv = 1 / Σ_c
  int64_t cidx[TP][8];             // resampled stage: native flat indices of the 2^rank corners
  float cw[TP][8];                 // and their weights
  Tile(int L_, int C_, int max_k) : L(L_), C(C_), x((size_t)L_ * C_ * TP), t((size_t)C_ * TP),
      z((size_t)C_ * TP), s((size_t)C_ * TP), g((size_t)C_ * TP), gx((size_t)L_ * C_ * TP),
      score((size_t)max_k * TP), alpha((size_t)max_k * TP), dalpha((size_t)max_k * TP) {}
  float* xs(int stage, int c) { return &x[((size_t)stage * C + c) * TP]; }
  float* gxs(int stage, int c) { return &gx[((size_t)stage * C + c) * TP]; }
};

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

// Corner indices (native flat, within a sample) and weights of output pixels q0 .. q0+n−1.
int corners(const Problem& pr, const Stage& S, int64_t q0, int n, Tile& tl) {
  const int64_t H = pr.out_size[1], W = pr.out_size[2];
  const int K = pr.spatial_rank == 3 ? 8 : 4;
  for (int p = 0; p < n; ++p) {
    const int64_t q = q0 + p;
    const int64_t od = q / (H * W), oh = (q / W) % H, ow = q % W;
    const Axis &ad = S.axis[0], &ah = S.axis[1], &aw = S.axis[2];
    const int64_t d[2] = {ad.i0[od], ad.i1[od]}, h[2] = {ah.i0[oh], ah.i1[oh]}, w[2] = {aw.i0[ow], aw.i1[ow]};
    const float ld[2] = {ad.l0[od], ad.l1[od]}, lh[2] = {ah.l0[oh], ah.l1[oh]}, lw[2] = {aw.l0[ow], aw.l1[ow]};
    for (int k = 0; k < K; ++k) {
      const int bd = (k >> 2) & 1, bh = (k >> 1) & 1, bw = k & 1;
      tl.cidx[p][k] = (d[bd] * S.size[1] + h[bh]) * S.size[2] + w[bw];
      tl.cw[p][k] = ld[bd] * (lh[bh] * lw[bw]);
    }
  }
  return K;
}

// Load logits, target and pixel weights of tile [p0, p0 + n) of sample b into `tl`.
// Resampled stages are interpolated on the fly from their native resolution.
// Pads the tail with zeros (w = 0). Reports the first bad value in `err` when `check`.
void load_tile(const Problem& pr, const std::vector<Stage>& stages, int64_t b, int64_t p0, int n, Tile& tl,
               bool check, ItemError& err) {
  const int L = pr.num_stages, C = (int)pr.classes;
  const int64_t P = pr.pixels;
  tl.n = n;
  for (int i = 0; i < L; ++i) {
    const Stage& S = stages[i];
    const int K = S.resampled ? corners(pr, S, p0, n, tl) : 0;
    for (int c = 0; c < C; ++c) {
      float* dst = tl.xs(i, c);
      if (S.resampled) {
        const int64_t base = (b * C + c) * S.pixels;
        for (int p = 0; p < n; ++p) {
          float v = 0.0f;
          for (int k = 0; k < K; ++k) v += tl.cw[p][k] * load_one(pr.logit_dtype, pr.logits[i], base + tl.cidx[p][k]);
          dst[p] = v;
        }
      } else {
        const int64_t off = (b * C + c) * P + p0;
        switch (pr.logit_dtype) {
          case DT_F32: { const float* src = (const float*)pr.logits[i] + off; for (int p = 0; p < n; ++p) dst[p] = src[p]; break; }
          case DT_F16: { const uint16_t* src = (const uint16_t*)pr.logits[i] + off; for (int p = 0; p < n; ++p) dst[p] = half_to_float(src[p]); break; }
          default:     { const uint16_t* src = (const uint16_t*)pr.logits[i] + off; for (int p = 0; p < n; ++p) dst[p] = bf16_to_float(src[p]); break; }
        }
      }
      for (int p = n; p < TP; ++p) dst[p] = 0.0f;
      if (check && err.code == ERR_NONE) {
        int bad = 0;
        for (int p = 0; p < n; ++p) bad |= !(dst[p] - dst[p] == 0.0f);
        if (bad) { err.code = ERR_LOGIT; err.value = i; }
      }
    }
  }
  if (pr.target_kind == TK_SOFT_F32) {
    for (int c = 0; c < C; ++c) {
      const float* src = (const float*)pr.target + (b * C + c) * P + p0;
      float* dst = &tl.t[(size_t)c * TP];
      int bad = 0;
      for (int p = 0; p < n; ++p) {
        dst[p] = src[p];
        bad |= !(src[p] >= 0.0f && src[p] - src[p] == 0.0f) || (pr.sigmoid && src[p] > 1.0f);
      }
      for (int p = n; p < TP; ++p) dst[p] = 0.0f;
      if (check && bad && err.code == ERR_NONE) err.code = ERR_SOFT;
    }
    for (int p = 0; p < TP; ++p) tl.w[p] = p < n ? 1.0f : 0.0f;
  } else {
    int64_t y[TP];
    const int64_t off = b * P + p0;
    switch (pr.target_kind) {
      case TK_U8:  load_labels((const uint8_t*)pr.target + off, n, y); break;
      case TK_I16: load_labels((const int16_t*)pr.target + off, n, y); break;
      case TK_I32: load_labels((const int32_t*)pr.target + off, n, y); break;
      default:     load_labels((const int64_t*)pr.target + off, n, y); break;
    }
    for (int p = n; p < TP; ++p) y[p] = 0;
    for (int p = 0; p < TP; ++p) {
      const bool ignored = p >= n || (pr.has_ignore && y[p] == pr.ignore_index);
      if (!ignored && (y[p] < 0 || y[p] >= pr.num_labels)) {
        if (check && err.code == ERR_NONE) { err.code = ERR_CLASS; err.value = y[p]; }
        y[p] = 0;
      }
      tl.w[p] = ignored ? 0.0f : 1.0f;
      if (ignored) y[p] = -1;
    }
    if (pr.num_labels != C) {  // binary sigmoid: the label itself is the target of the one channel
      for (int p = 0; p < TP; ++p) tl.t[p] = y[p] == 1 ? 1.0f : 0.0f;
    } else {
      for (int c = 0; c < C; ++c) {
        float* dst = &tl.t[(size_t)c * TP];
        for (int p = 0; p < TP; ++p) dst[p] = y[p] == c ? 1.0f : 0.0f;
      }
    }
  }
  if (pr.pixel_weight) {
    const float* src = pr.pixel_weight + b * P + p0;
    int bad = 0;
    for (int p = 0; p < n; ++p) {
      bad |= !(src[p] >= 0.0f && src[p] - src[p] == 0.0f);
      tl.w[p] *= src[p];
    }
    if (check && bad && err.code == ERR_NONE) err.code = ERR_WEIGHT;
  }
}

// Build map u of the current tile. Returns a pointer to its C×TP logits (either a stage's
// buffer for OP_ORIG, or tl.z). For OP_AWF, tl.alpha holds the k×TP attention weights.
const float* build_map(const Problem& pr, const Layout& ly, int u, Tile& tl) {
  const int C = ly.C;
  const int op = pr.map_op[u], arg = pr.map_arg[u];
  if (op == OP_ORIG) return tl.xs(arg, 0);
  const int k = pr.subset_size[arg];
  const int32_t* mem = pr.subset_members + ly.sub_start[arg];
  float* __restrict z = tl.z.data();
  switch (op) {
    case OP_ADD:
    case OP_MULT: {
      std::memcpy(z, tl.xs(mem[0], 0), sizeof(float) * C * TP);
      for (int j = 1; j < k; ++j) {
        const float* __restrict xj = tl.xs(mem[j], 0);
        if (op == OP_ADD) {
          for (int e = 0; e < C * TP; ++e) z[e] += xj[e];
        } else {
          for (int e = 0; e < C * TP; ++e) z[e] *= xj[e];
        }
      }
      break;
    }
    case OP_CAT: {
      const float* W = pr.cat_w + ly.cat_w_off[arg];
      const float* bias = pr.cat_b + ly.cat_b_off[arg];
      const int K = k * C;
      int c = 0;
      for (; c + 1 < C; c += 2) {  // two output classes per pass: each x row is loaded once
        Row a0 = row_splat(bias[c]), a1 = row_splat(bias[c + 1]);
        const float* W0 = W + (size_t)c * K;
        const float* W1 = W0 + K;
        for (int j = 0; j < k; ++j)
          for (int c2 = 0; c2 < C; ++c2) {
            const float* x = tl.xs(mem[j], c2);
            row_fma(a0, W0[j * C + c2], x);
            row_fma(a1, W1[j * C + c2], x);
          }
        row_store(z + (size_t)c * TP, a0);
        row_store(z + (size_t)(c + 1) * TP, a1);
      }
      for (; c < C; ++c) {
        Row acc = row_splat(bias[c]);
        for (int j = 0; j < k; ++j)
          for (int c2 = 0; c2 < C; ++c2) row_fma(acc, W[(size_t)c * K + j * C + c2], tl.xs(mem[j], c2));
        row_store(z + (size_t)c * TP, acc);
      }
      break;
    }
    case OP_AWF: {
      const float* V = pr.awf_v + ly.awf_v_off[arg];
      const float* cb = pr.awf_c + ly.awf_c_off[arg];
      const int K = k * C;
      float* __restrict a = tl.score.data();
      float* __restrict al = tl.alpha.data();
      for (int r = 0; r < k; ++r) {
        Row acc = row_splat(cb[r]);
        for (int j = 0; j < k; ++j) {
          if (pr.awf_block_diagonal && j != r) continue;  // official: V_S is block-diagonal
          for (int c2 = 0; c2 < C; ++c2) row_fma(acc, V[(size_t)r * K + j * C + c2], tl.xs(mem[j], c2));
        }
        row_store(a + (size_t)r * TP, acc);
      }
      float m[TP], sum[TP];
      for (int p = 0; p < TP; ++p) m[p] = a[p];
      for (int r = 1; r < k; ++r)
        for (int p = 0; p < TP; ++p) {
          const float v = a[(size_t)r * TP + p];
          m[p] = v > m[p] ? v : m[p];
        }
      for (int p = 0; p < TP; ++p) sum[p] = 0.0f;
      for (int r = 0; r < k; ++r)
        for (int p = 0; p < TP; ++p) {
          const float e = fast_exp(a[(size_t)r * TP + p] - m[p]);
          al[(size_t)r * TP + p] = e;
          sum[p] += e;
        }
      for (int p = 0; p < TP; ++p) sum[p] = 1.0f / sum[p];
      for (int r = 0; r < k; ++r)
        for (int p = 0; p < TP; ++p) al[(size_t)r * TP + p] *= sum[p];
      for (int c = 0; c < C; ++c) {
        Row acc = row_splat(0.0f);
        for (int j = 0; j < k; ++j) row_fma(acc, al + (size_t)j * TP, tl.xs(mem[j], c));
        row_store(z + (size_t)c * TP, acc);
      }
      break;
    }
  }
  return z;
}

// Activation of map logits z (C×TP) into tl.s. Sigmoid: s = σ(z). Softmax: s = exp(z − max),
// left unnormalized (consumers multiply by tl.inv = 1/Σ_c while they read it), and tl.lse.
void activate(const Problem& pr, const float* __restrict z, Tile& tl) {
  const int C = (int)pr.classes;
  float* __restrict s = tl.s.data();
  if (pr.sigmoid) {
    for (int e = 0; e < C * TP; ++e) {
      const float ez = fast_exp(-std::fabs(z[e]));
      const float iv = 1.0f / (1.0f + ez);
      s[e] = z[e] >= 0.0f ? iv : ez * iv;
    }
    return;
  }
  float m[TP], sum[TP];
  for (int p = 0; p < TP; ++p) m[p] = z[p];
  for (int c = 1; c < C; ++c)
    for (int p = 0; p < TP; ++p) {
      const float v = z[(size_t)c * TP + p];
      m[p] = v > m[p] ? v : m[p];
    }
  for (int p = 0; p < TP; ++p) sum[p] = 0.0f;
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < TP; ++p) {
      const float e = fast_exp(z[(size_t)c * TP + p] - m[p]);
      s[(size_t)c * TP + p] = e;
      sum[p] += e;
    }
  float* __restrict lse = tl.lse;
  float* __restrict inv = tl.inv;
  for (int p = 0; p < TP; ++p) {
    lse[p] = m[p] + fast_log(sum[p]);
    inv[p] = 1.0f / sum[p];
  }
}

// Accumulate the sums of one map (z, tl.s) into ce/inter/zsum (C each, double).
// Fold a row of TP per-pixel values into one VW-lane partial (no horizontal reduction per tile).
inline void fold_row(vf& acc, const float* r) {
  for (int i = 0; i < NV; ++i) acc += *(const vf*)(r + VW * i);
}

// Accumulate the sums of one map (z, tl.s) into VW-lane partials: lanes[c] (ce), lanes[C + c]
// (inter), lanes[2C + c] (zsum). The caller folds them into double every FLUSH_TILES tiles.
void accumulate_stats(const Problem& pr, const float* __restrict z, Tile& tl, vf* lanes) {
  const int C = (int)pr.classes;
  const float* __restrict s = tl.s.data();
  const float* __restrict w = tl.w;
  const float* __restrict lse = tl.lse;
  const float* __restrict inv = tl.inv;
  float ce_p[TP], i_p[TP], z_p[TP];
  for (int c = 0; c < C; ++c) {
    const float* __restrict zr = z + (size_t)c * TP;
    const float* __restrict sr = s + (size_t)c * TP;
    const float* __restrict tr = &tl.t[(size_t)c * TP];
    if (pr.sigmoid) {
      for (int p = 0; p < TP; ++p) {
        const float bce = std::max(zr[p], 0.0f) - zr[p] * tr[p] + fast_log1p(fast_exp(-std::fabs(zr[p])));
        ce_p[p] = w[p] * bce;
        i_p[p] = w[p] * sr[p] * tr[p];
        z_p[p] = w[p] * (pr.q == 2 ? sr[p] * sr[p] : sr[p]);
      }
    } else {
      for (int p = 0; p < TP; ++p) {
        const float sv = sr[p] * inv[p];
        ce_p[p] = w[p] * tr[p] * (lse[p] - zr[p]);
        i_p[p] = w[p] * sv * tr[p];
        z_p[p] = w[p] * (pr.q == 2 ? sv * sv : sv);
      }
    }
    fold_row(lanes[c], ce_p);
    fold_row(lanes[C + c], i_p);
    fold_row(lanes[2 * C + c], z_p);
  }
}

// dL/dz_u (C×TP) into tl.g from the statistic gradients of map u, sample b (C each).
void map_grad(const Problem& pr, Tile& tl, const float* gce, const float* gi, const float* gz) {
  const int C = (int)pr.classes;
  const float* s = tl.s.data();
  const float* __restrict t = tl.t.data();
  float* __restrict g = tl.g.data();
  const float* __restrict w = tl.w;
  const float qf = (float)pr.q;
  if (pr.sigmoid) {
    for (int c = 0; c < C; ++c) {
      const float* __restrict sr = s + (size_t)c * TP;
      const float* __restrict tr = t + (size_t)c * TP;
      float* __restrict gr = g + (size_t)c * TP;
      const float gic = gi[c], gzc = gz[c], gcec = gce[c];
      for (int p = 0; p < TP; ++p) {
        const float gs = gic * tr[p] + gzc * (pr.q == 2 ? qf * sr[p] : 1.0f);
        gr[p] = w[p] * (gs * sr[p] * (1.0f - sr[p]) + gcec * (sr[p] - tr[p]));
      }
    }
    return;
  }
  float dot[TP], a[TP];
  const float* __restrict inv = tl.inv;
  float* __restrict sw = tl.s.data();  // normalized here, in place
  for (int p = 0; p < TP; ++p) { dot[p] = 0.0f; a[p] = 0.0f; }
  for (int c = 0; c < C; ++c) {
    float* __restrict sr = sw + (size_t)c * TP;
    const float* __restrict tr = t + (size_t)c * TP;
    float* __restrict gr = g + (size_t)c * TP;
    const float gic = gi[c], gzc = gz[c], gcec = gce[c];
    for (int p = 0; p < TP; ++p) {
      const float sv = sr[p] * inv[p];
      sr[p] = sv;
      const float gs = gic * tr[p] + gzc * (pr.q == 2 ? qf * sv : 1.0f);
      gr[p] = gs;
      dot[p] += gs * sv;
      a[p] += gcec * tr[p];
    }
  }
  for (int c = 0; c < C; ++c) {
    const float* __restrict sr = s + (size_t)c * TP;
    const float* __restrict tr = t + (size_t)c * TP;
    float* __restrict gr = g + (size_t)c * TP;
    const float gcec = gce[c];
    for (int p = 0; p < TP; ++p)
      gr[p] = w[p] * (sr[p] * (gr[p] - dot[p] + a[p]) - gcec * tr[p]);
  }
}

// Parameter gradients: per tile, each is a dot product over the TP pixels. They are reduced to
// one float per parameter (a compact, L1-resident per-thread buffer, folded into the item's double
// partials every FLUSH_TILES tiles). VW dot products at a time are reduced together (with AVX-512
// by a transpose-and-add tree: 15 shuffles + adds for 16 sums instead of 16 horizontal reductions).
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

inline vf row_dot(const Row& a, const float* b) {  // per-lane partial of <a, b> over TP pixels
  vf r = a.v[0] * *(const vf*)b;
  for (int i = 1; i < NV; ++i) r += a.v[i] * *(const vf*)(b + VW * i);
  return r;
}

inline vf row_sum(const Row& a) {
  vf r = a.v[0];
  for (int i = 1; i < NV; ++i) r += a.v[i];
  return r;
}

inline float sum_tp(const float* __restrict a) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int p = 0; p < TP; ++p) acc += a[p];
  return acc;
}

// Push tl.g (dL/dz_u) through the operator of map u into tl.gx and the parameter partials.
// dparams: one float partial per packed parameter (per thread, flushed to double by the caller).
void op_backward(const Problem& pr, const Layout& ly, int u, Tile& tl, float* dparams) {
  const int C = ly.C;
  const int op = pr.map_op[u], arg = pr.map_arg[u];
  const float* __restrict g = tl.g.data();
  if (op == OP_ORIG) {
    float* __restrict gx = tl.gxs(arg, 0);
    for (int e = 0; e < C * TP; ++e) gx[e] += g[e];
    return;
  }
  const int k = pr.subset_size[arg];
  const int32_t* mem = pr.subset_members + ly.sub_start[arg];
  const int K = k * C;
  switch (op) {
    case OP_ADD:
      for (int j = 0; j < k; ++j) {
        float* __restrict gx = tl.gxs(mem[j], 0);
        for (int e = 0; e < C * TP; ++e) gx[e] += g[e];
      }
      break;
    case OP_MULT:
      for (int j = 0; j < k; ++j) {  // d/dz_j = g · Π_{i≠j} z_i (no division)
        float* __restrict gx = tl.gxs(mem[j], 0);
        float* __restrict tmp = tl.z.data();
        std::memcpy(tmp, g, sizeof(float) * C * TP);
        for (int i = 0; i < k; ++i) {
          if (i == j) continue;
          const float* __restrict xi = tl.xs(mem[i], 0);
          for (int e = 0; e < C * TP; ++e) tmp[e] *= xi[e];
        }
        for (int e = 0; e < C * TP; ++e) gx[e] += tmp[e];
      }
      break;
    case OP_CAT: {
      const float* W = pr.cat_w + ly.cat_w_off[arg];
      float* dW = dparams + ly.cat_w_off[arg];
      float* db = dparams + ly.cat_w_n + ly.cat_b_off[arg];
      for (int c = 0; c < C; ++c) {
        const Row grow = row_load(g + (size_t)c * TP);  // held in registers across the K dot products
        db[c] += hsum(row_sum(grow));
        float* dWc = dW + (size_t)c * K;
        for (int q0 = 0; q0 < K; q0 += VW) {  // VW (member, class) columns at a time
          const int nq = std::min(VW, K - q0);
          vf acc[VW];
          for (int q = 0; q < VW; ++q)
            acc[q] = q < nq ? row_dot(grow, tl.xs(mem[(q0 + q) / C], (q0 + q) % C)) : vf{};
          const vf sums = reduce_lanes(acc);
          for (int q = 0; q < nq; ++q) dWc[q0 + q] += sums[q];
        }
      }
      for (int j = 0; j < k; ++j)
        for (int c2 = 0; c2 < C; ++c2) {
          float* gx = tl.gxs(mem[j], c2);
          Row acc = row_load(gx);
          for (int c = 0; c < C; ++c) row_fma(acc, W[(size_t)c * K + j * C + c2], g + (size_t)c * TP);
          row_store(gx, acc);
        }
      break;
    }
    case OP_AWF: {
      const float* V = pr.awf_v + ly.awf_v_off[arg];
      float* dV = dparams + ly.cat_w_n + ly.cat_b_n + ly.awf_v_off[arg];
      float* dc = dparams + ly.cat_w_n + ly.cat_b_n + ly.awf_v_n + ly.awf_c_off[arg];
      const float* __restrict al = tl.alpha.data();
      float* __restrict da = tl.dalpha.data();
      for (int j = 0; j < k; ++j) {  // dz_{s_j} += α_j g ; dα_j = <g, z_{s_j}>
        float* __restrict dar = da + (size_t)j * TP;
        const float* __restrict ar = al + (size_t)j * TP;
        for (int p = 0; p < TP; ++p) dar[p] = 0.0f;
        for (int c = 0; c < C; ++c) {
          const float* __restrict gr = g + (size_t)c * TP;
          const float* __restrict xr = tl.xs(mem[j], c);
          float* __restrict gx = tl.gxs(mem[j], c);
          for (int p = 0; p < TP; ++p) {
            gx[p] += ar[p] * gr[p];
            dar[p] += gr[p] * xr[p];
          }
        }
      }
      float dot[TP];  // da = α ⊙ (dα − <α, dα>)
      for (int p = 0; p < TP; ++p) dot[p] = 0.0f;
      for (int j = 0; j < k; ++j)
        for (int p = 0; p < TP; ++p) dot[p] += al[(size_t)j * TP + p] * da[(size_t)j * TP + p];
      for (int j = 0; j < k; ++j)
        for (int p = 0; p < TP; ++p) da[(size_t)j * TP + p] = al[(size_t)j * TP + p] * (da[(size_t)j * TP + p] - dot[p]);
      for (int r = 0; r < k; ++r) {
        const Row darow = row_load(da + (size_t)r * TP);
        dc[r] += hsum(row_sum(darow));
        for (int j = 0; j < k; ++j) {
          if (pr.awf_block_diagonal && j != r) continue;
          for (int c2 = 0; c2 < C; ++c2) dV[(size_t)r * K + j * C + c2] += hsum(row_dot(darow, tl.xs(mem[j], c2)));
        }
      }
      for (int j = 0; j < k; ++j)
        for (int c2 = 0; c2 < C; ++c2) {
          float* gx = tl.gxs(mem[j], c2);
          Row acc = row_load(gx);
          for (int r = 0; r < k; ++r) {
            if (pr.awf_block_diagonal && j != r) continue;
            row_fma(acc, V[(size_t)r * K + j * C + c2], da + (size_t)r * TP);
          }
          row_store(gx, acc);
        }
      break;
    }
  }
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

extern "C" {

int lomix_cpu_abi_version() { return 1; }

// Forward sums. Outputs (float32): ce, inter, zsum (M, B, C); tsum, tpow (B, C); count (B,).
// Returns an Err code (0 = ok); *err_value holds the offending class index / stage.
int lomix_cpu_forward(const Problem* prp, float* ce, float* inter, float* zsum, float* tsum,
                      float* tpow, float* count, int64_t* err_value) {
  const Problem& pr = *prp;
  const Layout ly(pr);
  const int C = ly.C, M = ly.M;
  const std::vector<Stage> stages = make_stages(pr);
  const std::vector<Item> items = make_items(pr);
  const int64_t nI = (int64_t)items.size();
  const size_t map_block = (size_t)3 * M * C;   // ce, inter, zsum per map and class
  const size_t item_block = map_block + 2 * C + 1;  // + tsum, tpow, count
  std::vector<double> part((size_t)nI * item_block, 0.0);
  std::vector<ItemError> errs(nI);

#pragma omp parallel num_threads(num_threads(pr))
  {
    Tile tl(ly.L, C, ly.max_k);
    std::vector<float> lane_buf(map_block * VW);  // VW-lane float partials of the per-map sums
    vf* lanes = (vf*)lane_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nI; ++it) {
      const Item item = items[it];
      double* acc = &part[(size_t)it * item_block];
      auto flush = [&]() {
        for (size_t e = 0; e < map_block; ++e) { acc[e] += hsum(lanes[e]); lanes[e] = vf{}; }
      };
      std::fill(lane_buf.begin(), lane_buf.end(), 0.0f);
      int64_t tiles = 0;
      for (int64_t p0 = item.p0; p0 < item.p1; p0 += TP) {
        const int n = (int)std::min<int64_t>(TP, item.p1 - p0);
        if (++tiles % FLUSH_TILES == 0) flush();
        load_tile(pr, stages, item.b, p0, n, tl, true, errs[it]);
        if (errs[it].code != ERR_NONE) break;
        for (int u = 0; u < M; ++u) {
          const float* z = build_map(pr, ly, u, tl);
          activate(pr, z, tl);
          accumulate_stats(pr, z, tl, &lanes[(size_t)u * 3 * C]);
        }
        double* tg = acc + map_block;
        for (int c = 0; c < C; ++c) {
          const float* tr = &tl.t[(size_t)c * TP];
          float s1 = 0.0f, sq = 0.0f;
          for (int p = 0; p < TP; ++p) {
            s1 += tl.w[p] * tr[p];
            sq += tl.w[p] * (pr.q == 2 ? tr[p] * tr[p] : tr[p]);
          }
          tg[c] += s1;
          tg[C + c] += sq;
        }
        tg[2 * C] += sum_tp(tl.w);
      }
      flush();
    }
  }
  const int code = first_error(errs, err_value);
  if (code != ERR_NONE) return code;

  const int64_t B = pr.batch;
  std::vector<double> red((size_t)B * item_block, 0.0);
  for (int64_t it = 0; it < nI; ++it) {  // fixed order
    const double* src = &part[(size_t)it * item_block];
    double* dst = &red[(size_t)items[it].b * item_block];
    for (size_t e = 0; e < item_block; ++e) dst[e] += src[e];
  }
  for (int64_t b = 0; b < B; ++b) {
    const double* r = &red[(size_t)b * item_block];
    for (int u = 0; u < M; ++u)
      for (int c = 0; c < C; ++c) {
        const size_t o = ((size_t)u * B + b) * C + c;
        ce[o] = (float)r[(size_t)u * 3 * C + c];
        inter[o] = (float)r[(size_t)u * 3 * C + C + c];
        zsum[o] = (float)r[(size_t)u * 3 * C + 2 * C + c];
      }
    for (int c = 0; c < C; ++c) {
      tsum[b * C + c] = (float)r[map_block + c];
      tpow[b * C + c] = (float)r[map_block + C + c];
    }
    count[b] = (float)r[map_block + 2 * C];
  }
  return ERR_NONE;
}

// Backward. Inputs: statistic gradients gce, ginter, gzsum (M, B, C) float32.
// Outputs: grad_logits[i] (B, C, P) in the logits' dtype (written, not accumulated);
// dparams (float32) packed as [cat_w | cat_b | awf_v | awf_c] in the Layout's order.
int lomix_cpu_backward(const Problem* prp, const float* gce, const float* ginter, const float* gzsum,
                       void* const* grad_logits, float* dparams) {
  const Problem& pr = *prp;
  const Layout ly(pr);
  const int C = ly.C, M = ly.M, L = ly.L;
  const int64_t B = pr.batch, P = pr.pixels;
  const std::vector<Stage> stages = make_stages(pr);
  const std::vector<Item> items = make_items(pr);
  const int64_t nI = (int64_t)items.size();
  const int64_t nP = ly.num_params();
  std::vector<double> part((size_t)nI * nP, 0.0);
  std::vector<ItemError> errs(nI);
  // Resampled stages: each item scatters the interpolation adjoint into a private double buffer
  // over the native rows its band touches; buffers are summed in item order afterwards.
  const int oa = outer_axis(pr);
  auto row_stride = [&](const Stage& S) { return oa == OUTER_3D ? S.size[1] * S.size[2] : S.size[2]; };
  std::vector<std::vector<double>> scatter((size_t)nI * L);
  std::vector<int64_t> first_row((size_t)nI * L, 0);

#pragma omp parallel num_threads(num_threads(pr))
  {
    Tile tl(L, C, ly.max_k);
    std::vector<float> lanes((size_t)nP);  // per-parameter float partials of the current flush window
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nI; ++it) {
      const Item item = items[it];
      float* dp = lanes.data();
      double* out = nP ? &part[(size_t)it * nP] : nullptr;
      auto flush = [&]() {
        for (int64_t e = 0; e < nP; ++e) out[e] += dp[e];
        std::fill(lanes.begin(), lanes.end(), 0.0f);
      };
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      int64_t tiles = 0;
      for (int64_t p0 = item.p0; p0 < item.p1; p0 += TP) {
        const int n = (int)std::min<int64_t>(TP, item.p1 - p0);
        if (++tiles % FLUSH_TILES == 0) flush();
        load_tile(pr, stages, item.b, p0, n, tl, false, errs[it]);
        std::fill(tl.gx.begin(), tl.gx.end(), 0.0f);
        for (int u = 0; u < M; ++u) {
          const size_t o = ((size_t)u * B + item.b) * C;
          const float* z = build_map(pr, ly, u, tl);
          activate(pr, z, tl);
          map_grad(pr, tl, gce + o, ginter + o, gzsum + o);
          op_backward(pr, ly, u, tl, dp);
        }
        for (int i = 0; i < L; ++i) {
          const Stage& S = stages[i];
          if (!S.resampled) continue;
          std::vector<double>& buf = scatter[(size_t)it * L + i];
          const int64_t stride = row_stride(S);
          if (buf.empty()) {
            const Axis& ax = S.axis[oa];
            first_row[(size_t)it * L + i] = ax.i0[item.r0];
            buf.assign((size_t)(ax.i1[item.r1 - 1] - ax.i0[item.r0] + 1) * stride * C, 0.0);
          }
          const int64_t off = first_row[(size_t)it * L + i] * stride;
          const int64_t len = (int64_t)buf.size() / C;
          const int K = corners(pr, S, p0, n, tl);
          for (int c = 0; c < C; ++c) {
            const float* g = tl.gxs(i, c);
            double* bc = buf.data() + (size_t)c * len;
            for (int p = 0; p < n; ++p)
              for (int k = 0; k < K; ++k) bc[tl.cidx[p][k] - off] += (double)(tl.cw[p][k] * g[p]);
          }
        }
        for (int i = 0; i < L; ++i)
          for (int c = 0; c < C; ++c) {
            if (stages[i].resampled) continue;
            const float* src = tl.gxs(i, c);
            const int64_t off = (item.b * C + c) * P + p0;
            switch (pr.logit_dtype) {
              case DT_F32: { float* d = (float*)grad_logits[i] + off; for (int p = 0; p < n; ++p) d[p] = src[p]; break; }
              case DT_F16: { uint16_t* d = (uint16_t*)grad_logits[i] + off; for (int p = 0; p < n; ++p) d[p] = float_to_half(src[p]); break; }
              default:     { uint16_t* d = (uint16_t*)grad_logits[i] + off; for (int p = 0; p < n; ++p) d[p] = float_to_bf16(src[p]); break; }
            }
          }
      }
      flush();
    }
  }
  for (int i = 0; i < L; ++i) {  // interpolation adjoint: sum the item buffers in a fixed order
    const Stage& S = stages[i];
    if (!S.resampled) continue;
    const int64_t stride = row_stride(S);
#pragma omp parallel for num_threads(num_threads(pr)) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> acc((size_t)C * S.pixels, 0.0);
      for (int64_t it = 0; it < nI; ++it) {
        if (items[it].b != b) continue;
        const std::vector<double>& buf = scatter[(size_t)it * L + i];
        if (buf.empty()) continue;
        const int64_t len = (int64_t)buf.size() / C, off = first_row[(size_t)it * L + i] * stride;
        for (int c = 0; c < C; ++c)
          for (int64_t e = 0; e < len; ++e) acc[(size_t)c * S.pixels + off + e] += buf[(size_t)c * len + e];
      }
      const int64_t base = b * C * S.pixels;
      for (int64_t e = 0; e < C * S.pixels; ++e) {
        const float v = (float)acc[e];
        switch (pr.logit_dtype) {
          case DT_F32: ((float*)grad_logits[i])[base + e] = v; break;
          case DT_F16: ((uint16_t*)grad_logits[i])[base + e] = float_to_half(v); break;
          default:     ((uint16_t*)grad_logits[i])[base + e] = float_to_bf16(v); break;
        }
      }
    }
  }
  if (nP) {
    std::vector<double> red((size_t)nP, 0.0);
    for (int64_t it = 0; it < nI; ++it) {  // fixed order
      const double* src = &part[(size_t)it * nP];
      for (int64_t e = 0; e < nP; ++e) red[e] += src[e];
    }
    for (int64_t e = 0; e < nP; ++e) dparams[e] = (float)red[e];
  }
  return ERR_NONE;
}

}  // extern "C"
