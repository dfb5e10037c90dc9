// Activation (softmax / sigmoid) of a map and its per-class statistics (CE, intersection, sum).
#pragma once

#include "layout.h"

namespace {

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

}  // namespace
