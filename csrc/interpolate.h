// Loading a tile: every stage at the tile's pixels, read in place or interpolated on the fly
// (bilinear / trilinear, align_corners=False), and the target and pixel weights.
#pragma once

#include "layout.h"

namespace {

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

// Interpolation is separable: an output row (fixed od, oh) mixes the same 4 native rows (2 in 2D: the
// (d, h) corners, weights ld·lh) at every pixel, and only the W corners vary along it. So a tile's
// row segment is interpolated as: mix the native rows over the W range it touches (4 FMAs per native
// pixel), then 2 FMAs per output pixel along W — instead of 8 gathered corners per output pixel.

// The native rows stage S mixes for output row `row` (od·H + oh): their flat offsets (within a
// sample) and weights ld·lh. Returns how many: 4 in 3D, 2 in 2D.
inline int mixed_rows(const Problem& pr, const Stage& S, int64_t row, int64_t off[4], float wt[4]) {
  const int64_t H = pr.out_size[1], od = row / H, oh = row % H;
  const Axis &ad = S.axis[0], &ah = S.axis[1];
  const int64_t d[2] = {ad.i0[od], ad.i1[od]}, h[2] = {ah.i0[oh], ah.i1[oh]};
  const float ld[2] = {ad.l0[od], ad.l1[od]}, lh[2] = {ah.l0[oh], ah.l1[oh]};
  int m = 0;
  for (int bd = 0; bd < (pr.spatial_rank == 3 ? 2 : 1); ++bd)
    for (int bh = 0; bh < 2; ++bh) {
      off[m] = (d[bd] * S.size[1] + h[bh]) * S.size[2];
      wt[m++] = ld[bd] * lh[bh];
    }
  return m;
}

// A run of tile pixels [p, p + len) in one output row, from output column ow, and what stage S
// mixes for it: m native rows (offsets, weights) over the native columns [w_lo, w_lo + nw) — at
// most len + 1 of them, since stages are never finer than the target.
struct Segment {
  int p, len, m;
  int64_t ow, w_lo, nw;
  int64_t off[4];
  float wt[4];
};

// Calls f(segment) for each output-row segment of the tile pixels [q0, q0 + n).
template <class F>
inline void for_segments(const Problem& pr, const Stage& S, int64_t q0, int n, F f) {
  const int64_t W = pr.out_size[2];
  const Axis& aw = S.axis[2];
  for (int p = 0; p < n;) {
    Segment sg;
    sg.p = p;
    sg.ow = (q0 + p) % W;
    sg.len = (int)std::min<int64_t>(n - p, W - sg.ow);
    sg.m = mixed_rows(pr, S, (q0 + p) / W, sg.off, sg.wt);
    sg.w_lo = aw.i0[sg.ow];
    sg.nw = aw.i1[sg.ow + sg.len - 1] - sg.w_lo + 1;
    f(sg);
    p += sg.len;
  }
}

// The m native rows of a segment mixed by their weights (M = m: 2 in 2D, 4 in 3D; vectorized over q).
template <int M>
inline void mix_rows(const float* const* rows, const float* wt, int64_t nw, float* __restrict mix) {
  for (int64_t q = 0; q < nw; ++q) {
    float v = wt[0] * rows[0][q];
    for (int r = 1; r < M; ++r) v = std::fma(wt[r], rows[r][q], v);
    mix[q] = v;
  }
}

// Stage i of sample b at tile pixels [p0, p0 + n), interpolated from its native resolution into
// tl.xs(i, ·). Per segment, every class's mixed rows first (into tl.mix), then the W corners: the
// vector loads of a class's mixed row come long after its stores (a load spanning stores still in
// flight waits for them: no store forwarding).
void interpolate_stage(const Problem& pr, const Stage& S, int i, int64_t b, int64_t p0, int n, Tile& tl) {
  const int C = (int)pr.classes;
  const Axis& aw = S.axis[2];
  for_segments(pr, S, p0, n, [&](const Segment& sg) {
    for (int c = 0; c < C; ++c) {
      const int64_t base = (b * C + c) * S.pixels + sg.w_lo;
      float* mix = tl.mixes(c);
      if (pr.logit_dtype == DT_F32) {
        const float* rows[4];
        for (int r = 0; r < sg.m; ++r) rows[r] = (const float*)pr.logits[i] + base + sg.off[r];
        if (sg.m == 2)
          mix_rows<2>(rows, sg.wt, sg.nw, mix);
        else
          mix_rows<4>(rows, sg.wt, sg.nw, mix);
      } else {
        for (int64_t q = 0; q < sg.nw; ++q) {
          float v = 0.0f;
          for (int r = 0; r < sg.m; ++r) v += sg.wt[r] * load_one(pr.logit_dtype, pr.logits[i], base + sg.off[r] + q);
          mix[q] = v;
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const float* mix = tl.mixes(c);
      float* dst = tl.xs(i, c) + sg.p;
      int t = 0;
#if defined(__AVX512F__)
      // 16 output pixels read at most 17 consecutive native columns (a stage is never finer than the
      // target): both corners by one two-register permute of mix from the vector's first column.
      for (; t + 16 <= sg.len; t += 16) {
        const int64_t o = sg.ow + t;
        if (aw.i1[o + 15] - aw.i0[o] >= 32) break;  // (never for such stages; the scalar loop would do)
        const float* tab = mix + (aw.i0[o] - sg.w_lo);
        const __m512 lo = _mm512_loadu_ps(tab), hi = _mm512_loadu_ps(tab + 16);
        const __m512i first = _mm512_set1_epi32(aw.i0[o]);
        const __m512i k0 = _mm512_sub_epi32(_mm512_loadu_si512(&aw.i0[o]), first);
        const __m512i k1 = _mm512_sub_epi32(_mm512_loadu_si512(&aw.i1[o]), first);
        const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(&aw.l0[o]), _mm512_permutex2var_ps(lo, k0, hi),
                                         _mm512_mul_ps(_mm512_loadu_ps(&aw.l1[o]), _mm512_permutex2var_ps(lo, k1, hi)));
        _mm512_storeu_ps(dst + t, v);
      }
#elif defined(__AVX2__)
      // 8 output pixels read at most 9 consecutive native columns: each corner from two 8-column table
      // registers (two permutes and a blend on the index's bit 3), the same FMA as the scalar loop.
      for (; t + 8 <= sg.len; t += 8) {
        const int64_t o = sg.ow + t;
        if (aw.i1[o + 7] - aw.i0[o] >= 16) break;  // (never for such stages; the scalar loop would do)
        const float* tab = mix + (aw.i0[o] - sg.w_lo);
        const __m256 lo = _mm256_loadu_ps(tab), hi = _mm256_loadu_ps(tab + 8);
        const __m256i first = _mm256_set1_epi32(aw.i0[o]), seven = _mm256_set1_epi32(7);
        auto corner = [&](const int32_t* idx) {
          const __m256i k = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)idx), first);
          return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, k), _mm256_permutevar8x32_ps(hi, k),
                                  _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, seven)));
        };
        const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(&aw.l0[o]), corner(&aw.i0[o]),
                                         _mm256_mul_ps(_mm256_loadu_ps(&aw.l1[o]), corner(&aw.i1[o])));
        _mm256_storeu_ps(dst + t, v);
      }
#endif
      for (; t < sg.len; ++t) {
        const int64_t o = sg.ow + t;
        dst[t] = std::fma(aw.l0[o], mix[aw.i0[o] - sg.w_lo], aw.l1[o] * mix[aw.i1[o] - sg.w_lo]);  // (as the vectors)
      }
    }
  });
}

#if defined(__AVX512F__)
// ---- the interpolation adjoint's column sums in vectors (AVX-512) ----------------------------------
constexpr int CHUNK = 16;  // output pixels per chunk (scatter_stage)
// A chunk of 16 consecutive output pixels of a row segment, and how its two W corners group them: the
// lanes whose i0 (i1) is the same native column are consecutive (i0, i1 nondecreasing), and a group
// ends at lane end0[j] (end1[j]) for the j-th column from base0 (base1) on.
struct WChunk {
  int at, base0, base1;           // first pixel (from the segment's), first columns (from w_lo)
  __mmask16 valid, q0, q1;        // lanes in the segment; the columns the chunk reaches through i0, i1
  __m512 l0, l1;                  // the corner weights (0 outside the segment)
  __m512i end0, end1;             // each column's last lane
};

template <int K>
inline __m512 lanes_up(__m512 x) {  // lane t gets x[t − K], zeros in
  return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), _mm512_setzero_si512(), 16 - K));
}

// The groups' ends and sizes of one corner's columns k (relative to the chunk's first, masked to valid).
inline void group_ends(__m512i k, __mmask16 valid, int nv, __m512i& end, __mmask16& q) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i next = _mm512_permutexvar_epi32(_mm512_min_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(1)),
                                                                 _mm512_set1_epi32(15)), k);
  const __mmask16 ends = (__mmask16)(_mm512_mask_cmpneq_epi32_mask(valid, next, k) | (1u << (nv - 1)));
  end = _mm512_maskz_compress_epi32(ends, iota);
  q = (__mmask16)((1u << __builtin_popcount(ends)) - 1u);
}

// The chunks of a segment (at most TP / CHUNK = 4).
inline int w_chunks(const Axis& aw, const Segment& sg, WChunk* ch) {
  int nc = 0;
  for (int at = 0; at < sg.len; at += 16, ++nc) {
    WChunk& w = ch[nc];
    const int nv = std::min(16, sg.len - at);
    const int64_t o = sg.ow + at;
    w.at = at;
    w.valid = (__mmask16)(nv == 16 ? 0xFFFFu : (1u << nv) - 1u);
    w.base0 = aw.i0[o] - (int)sg.w_lo;
    w.base1 = aw.i1[o] - (int)sg.w_lo;
    w.l0 = _mm512_maskz_loadu_ps(w.valid, &aw.l0[o]);
    w.l1 = _mm512_maskz_loadu_ps(w.valid, &aw.l1[o]);
    group_ends(_mm512_maskz_loadu_epi32(w.valid, &aw.i0[o]), w.valid, nv, w.end0, w.q0);
    group_ends(_mm512_maskz_loadu_epi32(w.valid, &aw.i1[o]), w.valid, nv, w.end1, w.q1);
  }
  return nc;
}

// The sums of a's lanes by group (group_ends): lane j holds group j's (j < popcount of its mask): an
// inclusive scan in the vector, each group's end picked by one permute, minus the previous group's end.
inline __m512 group_sums(__m512 a, __m512i end) {
  a = _mm512_add_ps(a, lanes_up<1>(a));
  a = _mm512_add_ps(a, lanes_up<2>(a));
  a = _mm512_add_ps(a, lanes_up<4>(a));
  a = _mm512_add_ps(a, lanes_up<8>(a));
  const __m512 e = _mm512_permutexvar_ps(end, a);
  return _mm512_sub_ps(e, lanes_up<1>(e));
}

// A chunk's column sums of one class (its gradients: g_row from the segment's first pixel) added into dst
// (the segment's columns from w_lo on): both corners' sums in one vector at base0 (base1 is base0 or
// base0 + 1), one load and one store — two stores to the same columns back to back stall the second's load
// (no store forwarding).
inline void add_chunk_sums(const WChunk& w, const float* g_row, float* dst) {
  const __m512 g = _mm512_maskz_loadu_ps(w.valid, g_row + w.at);
  const __m512 s0 = _mm512_maskz_mov_ps(w.q0, group_sums(_mm512_mul_ps(w.l0, g), w.end0));
  __m512 s1 = _mm512_maskz_mov_ps(w.q1, group_sums(_mm512_mul_ps(w.l1, g), w.end1));
  __mmask16 q = w.q0 | w.q1;
  if (w.base1 != w.base0) {
    if (w.q1 >> 15) {  // (17 columns: a stage of nearly the target's width; the last on its own)
      dst[w.base1 + 15] += s1[15];
    }
    s1 = lanes_up<1>(s1);
    q = w.q0 | (__mmask16)(w.q1 << 1);
  }
  float* d = dst + w.base0;
  _mm512_mask_storeu_ps(d, q, _mm512_add_ps(_mm512_maskz_loadu_ps(q, d), _mm512_add_ps(s0, s1)));
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// ---- the interpolation adjoint's column sums in vectors (AVX2): the AVX-512 scheme above in 8 lanes ----
// The same names and roles as the AVX-512 helpers (scatter_stage calls either); the groups' ends come from
// a scalar pass over the chunk's ≤ 8 columns (no compress in AVX2), made once per chunk and shared by the
// C classes.
constexpr int CHUNK = 8;  // output pixels per chunk (scatter_stage)
struct WChunk {
  int at, base0, base1;           // first pixel (from the segment's), first columns (from w_lo)
  bool last1;                     // i1 reaches a 9th column (its sum in lane 7 goes on its own)
  __m256i valid;                  // all ones on the lanes in the segment
  __m256 l0, l1;                  // the corner weights (0 outside the segment)
  __m256i end0, end1;             // each column's last lane
  __m256 q0, q1;                  // all ones on the lanes of the columns the chunk reaches through i0, i1
};

template <int K>
inline __m256 lanes_up(__m256 x) {  // lane t gets x[t − K], zeros in
  const __m256i idx = _mm256_setr_epi32((0 - K) & 7, (1 - K) & 7, (2 - K) & 7, (3 - K) & 7, (4 - K) & 7,
                                        (5 - K) & 7, (6 - K) & 7, (7 - K) & 7);
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(x, idx), _mm256_setzero_ps(), (1 << K) - 1);
}

// The groups' ends of one corner's columns idx[0..nv) (nondecreasing) and the mask of its group lanes.
inline void group_ends(const int32_t* idx, int nv, __m256i& end, __m256& q) {
  alignas(32) int32_t e[8] = {};
  alignas(32) int32_t on[8] = {};
  int groups = 0;
  for (int t = 0; t < nv; ++t)
    if (t == nv - 1 || idx[t + 1] != idx[t]) {
      e[groups] = t;
      on[groups++] = -1;
    }
  end = _mm256_load_si256((const __m256i*)e);
  q = _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)on));
}

// The chunks of a segment (at most TP / CHUNK = 8).
inline int w_chunks(const Axis& aw, const Segment& sg, WChunk* ch) {
  int nc = 0;
  for (int at = 0; at < sg.len; at += CHUNK, ++nc) {
    WChunk& w = ch[nc];
    const int nv = std::min(CHUNK, sg.len - at);
    const int64_t o = sg.ow + at;
    w.at = at;
    w.base0 = aw.i0[o] - (int)sg.w_lo;
    w.base1 = aw.i1[o] - (int)sg.w_lo;
    alignas(32) float l0[8] = {}, l1[8] = {};
    for (int t = 0; t < nv; ++t) {
      l0[t] = aw.l0[o + t];
      l1[t] = aw.l1[o + t];
    }
    w.valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    w.l0 = _mm256_load_ps(l0);
    w.l1 = _mm256_load_ps(l1);
    group_ends(&aw.i0[o], nv, w.end0, w.q0);
    group_ends(&aw.i1[o], nv, w.end1, w.q1);
    w.last1 = w.base1 != w.base0 && _mm256_movemask_ps(w.q1) >> 7;
  }
  return nc;
}

// The sums of a's lanes by group: an inclusive scan in the vector, each group's end picked by one
// permute, minus the previous group's end.
inline __m256 group_sums(__m256 a, __m256i end) {
  a = _mm256_add_ps(a, lanes_up<1>(a));
  a = _mm256_add_ps(a, lanes_up<2>(a));
  a = _mm256_add_ps(a, lanes_up<4>(a));
  const __m256 e = _mm256_permutevar8x32_ps(a, end);
  return _mm256_sub_ps(e, lanes_up<1>(e));
}

// A chunk's column sums of one class (its gradients: g_row from the segment's first pixel, read by a masked
// load) added into dst (the segment's columns from w_lo on): both corners' sums in one vector at base0, one
// load and one store of 8 columns (lanes past the chunk's columns add zeros; a mix row has TP + 32 floats).
inline void add_chunk_sums(const WChunk& w, const float* g_row, float* dst) {
  const __m256 g = _mm256_maskload_ps(g_row + w.at, w.valid);
  const __m256 s0 = _mm256_and_ps(w.q0, group_sums(_mm256_mul_ps(w.l0, g), w.end0));
  __m256 s1 = _mm256_and_ps(w.q1, group_sums(_mm256_mul_ps(w.l1, g), w.end1));
  if (w.base1 != w.base0) {
    if (w.last1) dst[w.base1 + 7] += _mm256_cvtss_f32(_mm256_permutevar8x32_ps(s1, _mm256_set1_epi32(7)));
    s1 = lanes_up<1>(s1);
  }
  float* d = dst + w.base0;
  _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_add_ps(s0, s1)));
}
#endif

// One class's column sums of a segment (acc: sg.nw of them) added into the m mixed native rows of its
// gradient buffer (bc: the class's plane from the segment's first column), each by its row weight.
template <class T>
inline void add_to_mixed_rows(const Segment& sg, const T* __restrict acc, double* bc) {
  for (int r = 0; r < sg.m; ++r) {
    double* __restrict row = bc + sg.off[r];
    const double wt = sg.wt[r];
    for (int64_t q = 0; q < sg.nw; ++q) row[q] += wt * (double)acc[q];
  }
}

// The adjoint of interpolate_stage: tl.gxs(i, ·) at tile pixels [p0, p0 + n) added into buf, stage
// i's native gradient of one sample (C planes of `plane` doubles, holding native flat indices from
// `first` on), along W first, then into the mixed rows. Along W, native column q receives the pixels
// t in [run0[q], run0[q + 1]) through its i0 corner and [run1[q], run1[q + 1]) through i1 (both
// nondecreasing in t). With AVX-512 each 16-pixel chunk's column sums come from a scan in the vector
// (add_chunk_sums: float sums of at most 16 products, then added in double), with AVX2 each 8-pixel
// chunk's (the same helpers in 8 lanes; ct3d-native's tile loads and scatter 161 -> 127 ms against the prefix sums on
// an AMD EPYC); otherwise each sum is a difference of prefix sums in double over the exact products l·g.
// Either way vector work per pixel, not a chain of dependent additions per column and class (those were
// ~68 ms of ct3d-native's backward).
void scatter_stage(const Problem& pr, const Stage& S, int i, int64_t p0, int n, Tile& tl, double* buf,
                   int64_t plane, int64_t first) {
  const int C = (int)pr.classes;
  const Axis& aw = S.axis[2];
  for_segments(pr, S, p0, n, [&](const Segment& sg) {
#if defined(__AVX512F__) || defined(__AVX2__)
    WChunk ch[TP / CHUNK];
    const int nc = w_chunks(aw, sg, ch);
    for (int c = 0; c < C; ++c) std::fill(tl.mixes(c), tl.mixes(c) + sg.nw, 0.0f);  // column sums (sg.nw ≤ TP + 1)
    for (int j = 0; j < nc; ++j)  // (chunk-major: a column two chunks share is stored long before it is read again)
      for (int c = 0; c < C; ++c) add_chunk_sums(ch[j], tl.gxs(i, c) + sg.p, tl.mixes(c));
    for (int c = 0; c < C; ++c) add_to_mixed_rows(sg, tl.mixes(c), buf + (size_t)c * plane + sg.w_lo - first);
#else
    int run0[TP + 2], run1[TP + 2];
    for (int q = 0, t0 = 0, t1 = 0; q <= sg.nw; ++q) {
      while (t0 < sg.len && aw.i0[sg.ow + t0] - sg.w_lo < q) ++t0;
      while (t1 < sg.len && aw.i1[sg.ow + t1] - sg.w_lo < q) ++t1;
      run0[q] = t0;
      run1[q] = t1;
    }
    const float* l0 = &aw.l0[sg.ow];
    const float* l1 = &aw.l1[sg.ow];
    const int len = (sg.len + DL - 1) / DL * DL;  // (zero-padded to whole vectors)
    alignas(ALIGN) double u0[TP + DL], u1[TP + DL], s0[TP + DL + 1], s1[TP + DL + 1], acc[TP + 1];
    for (int c = 0; c < C; ++c) {
      const float* g = tl.gxs(i, c) + sg.p;
      for (int t = 0; t < sg.len; ++t) {
        u0[t] = (double)l0[t] * (double)g[t];
        u1[t] = (double)l1[t] * (double)g[t];
      }
      for (int t = sg.len; t < len; ++t) u0[t] = u1[t] = 0.0;
      prefix_sums(u0, len, s0);
      prefix_sums(u1, len, s1);
      for (int64_t q = 0; q < sg.nw; ++q)
        acc[q] = (s0[run0[q + 1]] - s0[run0[q]]) + (s1[run1[q + 1]] - s1[run1[q]]);
      add_to_mixed_rows(sg, acc, buf + (size_t)c * plane + sg.w_lo - first);
    }
#endif
  });
}

// The logit rows of the next tile of sample b ([p0 + TP, p0 + 2·TP), when whole) of the stages at output
// resolution, asked into L2 while this tile computes: L·C rows of TP pixels are more streams than the
// hardware prefetcher follows. The load's wait (rdtsc, synapse2d, one thread): ~2400 time stamp counter
// ticks per tile without, ~1300 with; but the maps then run slower by nearly the difference (the lines
// arriving compete with their own L2 traffic), so the raw kernels gain ~1% on synapse2d, ~3.5% on ct3d
// here (benchmarks/CPU_LOG.md).
inline void prefetch_next_tile(const Problem& pr, const std::vector<Stage>& stages, int64_t b, int64_t p0) {
  if (p0 + 2 * TP > pr.pixels) return;
  const size_t es = logit_bytes(pr);
  for (int i = 0; i < pr.num_stages; ++i) {
    if (stages[i].resampled) continue;
    for (int64_t c = 0; c < pr.classes; ++c) {
      const char* next = (const char*)pr.logits[i] + ((b * pr.classes + c) * pr.pixels + p0 + TP) * es;
      for (size_t o = 0; o < TP * es; o += 64) prefetch_l2(next + o);
    }
  }
}

// Load logits, target and pixel weights of tile [p0, p0 + n) of sample b into `tl`.
// Resampled stages are interpolated on the fly from their native resolution.
// Pads the tail with zeros (w = 0). Reports the first bad value in `err` when `check`.
void load_tile(const Problem& pr, const std::vector<Stage>& stages, int64_t b, int64_t p0, int n, Tile& tl,
               bool check, ItemError& err) {
  const int L = pr.num_stages, C = (int)pr.classes;
  const int64_t P = pr.pixels;
  tl.n = n;
  std::fill(tl.ex_ready.begin(), tl.ex_ready.end(), 0);  // a new tile: no stage exponentials yet
  prefetch_next_tile(pr, stages, b, p0);
  for (int i = 0; i < L; ++i) {
    const Stage& S = stages[i];
    if (S.resampled) interpolate_stage(pr, S, i, b, p0, n, tl);
    for (int c = 0; c < C; ++c) {
      float* dst = tl.xs(i, c);
      if (!S.resampled) {
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
  int ones = 1;
  for (int p = 0; p < TP; ++p) ones &= tl.w[p] == 1.0f;
  tl.unit_weights = ones;
}

// Write the tile's gradient rows (tl.gx, n of TP pixels valid) of the stages at output resolution into
// grad_logits (B, C, P) in the logits' dtype; whole aligned rows with streaming stores (simd.h).
void store_gradient_rows(const Problem& pr, const std::vector<Stage>& stages, int64_t b, int64_t p0, int n,
                         Tile& tl, void* const* grad_logits) {
  const int C = (int)pr.classes;
  const size_t es = logit_bytes(pr);
  alignas(ALIGN) uint16_t half[TP];
  for (int i = 0; i < pr.num_stages; ++i) {
    if (stages[i].resampled) continue;  // (scatter_stage: through the interpolation adjoint)
    for (int c = 0; c < C; ++c) {
      const float* src = tl.gxs(i, c);
      void* dst = (char*)grad_logits[i] + ((b * C + c) * pr.pixels + p0) * es;
      const void* row = src;
      if (pr.logit_dtype != DT_F32) {
        for (int p = 0; p < n; ++p) half[p] = pr.logit_dtype == DT_F16 ? float_to_half(src[p]) : float_to_bf16(src[p]);
        row = half;
      }
      if (n == TP && can_stream(dst, TP * es))
        stream_lines(dst, row, TP * es);
      else
        std::memcpy(dst, row, n * es);
    }
  }
}

}  // namespace
