// Activation (softmax / sigmoid) of a map and its per-class statistics (CE, intersection, sum).
#pragma once

#include "maps.h"

namespace {

// The shifted exponentials of a softmax over classes: m = max_c z (TP), e = exp(z − m) (C×TP) and
// their sum over classes (TP), summed in class order while they are made (no pass of its own).
// m_known: m holds the max already (Tile::zmax), no pass for it.
inline void shifted_exps(const float* __restrict z, int C, float* __restrict e, float* __restrict m,
                         float* __restrict sum, bool m_known = false) {
  for (int i = 0; i < NV && !m_known; ++i) {  // two running maxima per pixel vector (odd and even classes): half the
    vf m0 = *(const vf*)(z + VW * i), m1 = m0;  // dependent chain (benchmarks/cpu_cycles.cpp: 4.2 -> 1.6 slots)
    for (int c = 1; c + 1 < C; c += 2) {
      m0 = vmax(*(const vf*)(z + (size_t)c * TP + VW * i), m0);
      m1 = vmax(*(const vf*)(z + (size_t)(c + 1) * TP + VW * i), m1);
    }
    if (C % 2 == 0) m0 = vmax(*(const vf*)(z + (size_t)(C - 1) * TP + VW * i), m0);
    *(vf*)(m + VW * i) = vmax(m1, m0);
  }
  for (int i0 = 0; i0 < NV; i0 += PIXEL_GROUP) {  // PIXEL_GROUP class sums in registers beside the exponential's constants
    vf acc[PIXEL_GROUP] = {};
    for (int c = 0; c < C; ++c)
      for (int i = i0; i < i0 + PIXEL_GROUP; ++i) {
        const vf v = exp_nonpositive_v(*(const vf*)(z + (size_t)c * TP + VW * i) - *(const vf*)(m + VW * i));
        *(vf*)(e + (size_t)c * TP + VW * i) = v;
        acc[i - i0] += v;
      }
    for (int i = 0; i < PIXEL_GROUP; ++i) *(vf*)(sum + VW * (i0 + i)) = acc[i];
  }
}

// inv (and with_lse: lse) of unnormalized exponentials with shift m and class sum `sum` (TP), in
// vectors; m null: lse = log(sum) alone (the shifted log-sum-exp, activate_map). With check: false (nothing
// written) when some pixel's sum is not ≥ 1e-20: its exponentials underflowed — possible only for a product
// of exponentials (activate_map); a shift by the max gives a sum ≥ 1 (its class contributes exp(0)). The
// backward needs no lse (no logarithm).
bool finish_softmax(const float* __restrict m, const float* __restrict sum, Tile& tl, bool with_lse,
                    bool check) {
  if (check) {
    typedef int32_t vi __attribute__((vector_size(VW * 4)));
    vi ok = *(const vf*)sum >= 1e-20f;  // all ones where the sum is usable (false for NaN)
    for (int i = 1; i < NV; ++i) ok &= *(const vf*)(sum + VW * i) >= 1e-20f;
    for (int l = 0; l < VW; ++l)
      if (!ok[l]) return false;
  }
  if (with_lse && m) {
    for (int i = 0; i < NV; ++i) *(vf*)(tl.lse + VW * i) = *(const vf*)(m + VW * i) + log_v(*(const vf*)(sum + VW * i));
  } else if (with_lse) {
    for (int i = 0; i < NV; ++i) *(vf*)(tl.lse + VW * i) = log_v(*(const vf*)(sum + VW * i));
  }
  for (int i = 0; i < NV; ++i) *(vf*)(tl.inv + VW * i) = reciprocal_v(*(const vf*)(sum + VW * i));
  return true;
}

// Activation of map logits z (C×TP) into tl.s. Sigmoid: s = σ(z). Softmax: s = exp(z − max),
// left unnormalized (consumers multiply by tl.inv = 1/Σ_c while they read it), and (with_lse) tl.lse.
// z is the logits build_map made last (its tl.zmax, where ready, is their max).
void activate(const Problem& pr, const float* __restrict z, Tile& tl, bool with_lse) {
  const int C = (int)pr.classes;
  float* __restrict s = tl.s.data();
  tl.probs = s;
  if (pr.sigmoid) {
    for (int e = 0; e < C * TP; ++e) {
      const float ez = fast_exp(-std::fabs(z[e]));
      const float iv = 1.0f / (1.0f + ez);
      s[e] = z[e] >= 0.0f ? iv : ez * iv;
    }
    return;
  }
  alignas(ALIGN) float sum[TP];
  shifted_exps(z, C, s, tl.zmax, sum, tl.zmax_ready);  // (the max kept by build_map, or made here)
  finish_softmax(tl.zmax, sum, tl, with_lse, false);
}

// exp(x_j − max_c x_j) of stage j alone into tl.ex (the max and the sum into tl.emax, tl.esum), once
// per tile: an original map's softmax and the factors of every add map's exponentials.
void stage_exp(const Problem& pr, Tile& tl, int j) {
  if (tl.ex_ready[j]) return;
  shifted_exps(tl.xs(j, 0), (int)pr.classes, tl.exs(j), &tl.emax[(size_t)j * TP], &tl.esum[(size_t)j * TP]);
  tl.ex_ready[j] = 1;
}

// out = a ⊙ b over C×TP (out may be a); with sum, also Σ_c out into sum (TP), in class order.
inline void product_rows(int C, const float* a, const float* b, float* out, float* sum) {
  vf acc[NV] = {};
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < NV; ++i) {
      const size_t o = (size_t)c * TP + VW * i;
      const vf v = *(const vf*)(a + o) * *(const vf*)(b + o);
      *(vf*)(out + o) = v;
      acc[i] += v;
    }
  if (sum)
    for (int i = 0; i < NV; ++i) *(vf*)(sum + VW * i) = acc[i];
}

// Whether map u's softmax is made from its stages' exponentials (Layout::add_by_product; activate_map).
inline bool by_product(const Problem& pr, const Layout& ly, int u) {
  return ly.add_by_product && (pr.map_op[u] == OP_ORIG || pr.map_op[u] == OP_ADD);
}

// The stages map u is made of (n of them): its stage for an original map, else its subset's members.
inline const int32_t* map_stages(const Problem& pr, const Layout& ly, int u, int& n) {
  const int arg = pr.map_arg[u];
  if (pr.map_op[u] == OP_ORIG) {
    n = 1;
    return &pr.map_arg[u];
  }
  n = pr.subset_size[arg];
  return pr.subset_members + ly.sub_start[arg];
}

// Whether the backward builds map u's logits: every map but an add map whose softmax is made from its
// members' exponentials (by_product), which needs none (activate_map builds them only for a fallback).
inline bool backward_builds_logits(const Problem& pr, const Layout& ly, int u) {
  return !(by_product(pr, ly, u) && pr.map_op[u] == OP_ADD);
}

// Activation of map u (logits z, from build_map) into tl.s / tl.lse / tl.inv, as activate() does;
// with Layout::add_by_product, an original map's exponentials are its stage's (stage_exp) and an
// add map's are the products of its members': exp(Σ_j x_j − Σ_j m_j) = Π_j exp(x_j − m_j), no
// exponential of its own (exact in exact arithmetic; where a pixel's product sum underflows, the
// tile falls back to activate()). The kernels run with denormals flushed to zero (FlushDenormals).
// z may be null for such a map (neither pass builds it: by_product); it is built here only for a fallback.
// Returns the logits activated, or null where the softmax came from the stages' exponentials: then lse is
// the log of the shifted sum alone, and the CE sums take the shifts and logits from the stages'
// (stage_ce_sums, accumulate_stats).
const float* activate_map(const Problem& pr, const Layout& ly, int u, const float* z, Tile& tl, bool with_lse) {
  const int op = pr.map_op[u];
  if (!by_product(pr, ly, u)) {
    activate(pr, z, tl, with_lse);
    return z;
  }
  const int C = ly.C, arg = pr.map_arg[u];
  if (op == OP_ORIG) {  // the stage's exponentials as they are (no copy)
    stage_exp(pr, tl, arg);
    tl.probs = tl.exs(arg);
    finish_softmax(nullptr, &tl.esum[(size_t)arg * TP], tl, with_lse, false);
    return nullptr;
  }
  const int k = pr.subset_size[arg];
  const int32_t* mem = pr.subset_members + ly.sub_start[arg];
  float* s = tl.s.data();
  tl.probs = s;
  alignas(ALIGN) float sum[TP];
  for (int j = 0; j < k; ++j) stage_exp(pr, tl, mem[j]);
  for (int j = 1; j < k; ++j)  // s = e_0 · e_1 (· e_2 ...); the last product also sums over classes
    product_rows(C, j == 1 ? tl.exs(mem[0]) : s, tl.exs(mem[j]), s, j == k - 1 ? sum : nullptr);
  if (finish_softmax(nullptr, sum, tl, with_lse, true)) return nullptr;
  z = z ? z : build_map(pr, ly, u, tl);
  activate(pr, z, tl, with_lse);
  return z;
}

// The forward's per-tile target statistics, added into tg: Σω·t (C), Σω·t^q (C) and Σω; and tl.tw = ω·t,
// the weights of every map's CE sum (accumulate_stats). The sums in VW-lane vectors, folded VW classes
// at a time (a float sum over the tile's pixels one by one is a chain of TP dependent additions per
// class: the forward's tile load in make cycles 123 -> 54 slots). Hard labels and unit weights give integer sums:
// exact in any order.
void target_stats(const Problem& pr, Tile& tl, double* tg) {
  const int C = (int)pr.classes;
  const float* __restrict w = tl.w;
  const bool q2 = pr.q == 2;
  for (int c0 = 0; c0 < C; c0 += VW) {
    const int nc = std::min(VW, C - c0);
    vf s1[VW], sq[VW];
    for (int j = 0; j < nc; ++j) {
      const float* __restrict tr = &tl.t[(size_t)(c0 + j) * TP];
      float* __restrict twr = &tl.tw[(size_t)(c0 + j) * TP];
      vf a = vf{}, b = vf{};
      for (int i = 0; i < NV; ++i) {
        const vf tv = *(const vf*)(tr + VW * i);
        const vf twv = *(const vf*)(w + VW * i) * tv;
        *(vf*)(twr + VW * i) = twv;
        a += twv;
        b += q2 ? twv * tv : twv;
      }
      s1[j] = a;
      sq[j] = b;
    }
    fold_lanes(tg + c0, s1, (size_t)nc);
    fold_lanes(tg + C + c0, sq, (size_t)nc);
  }
  tg[2 * C] += sum_tp(tl.w);
}

// The forward's CE sums of stage j's shifted logits over the tile, once per tile (forward_maps): lanes of
// Σ_pixels tw_c·(x_{j,c} − m_j) into tl.ce_stage (C VW-lane vectors), m_j the stage's max over classes
// (stage_exp). A map whose softmax is its stages' exponentials (activate_map: an original map, an add map
// made by product) has the log-sum-exp Σ_j m_j + log(sum) and logits Σ_j x_j, so its CE sum per class is
// Σ tw_c·log(sum) − Σ_j (this sum of member j): no logits built, one FMA per class vector for its own part.
// Σ tw·(x − max) ≤ 0; for an original map log(sum) ≥ 0 (its max class adds exp(0)), so its small CE where it
// is confident is never the difference of two large sums (as lse − z would be); for an add map log(sum) < 0
// only where its members disagree, by about their disagreement (the product of their exponentials is small).
void stage_ce_sums(const Problem& pr, Tile& tl, int j) {
  static_assert(NV % 2 == 0, "two sums over the tile's vectors");
  const int C = (int)pr.classes;
  const float* __restrict m = &tl.emax[(size_t)j * TP];
  vf* __restrict out = (vf*)&tl.ce_stage[(size_t)j * C * VW];
  for (int c = 0; c < C; ++c) {
    const float* __restrict x = tl.xs(j, c);
    const float* __restrict tw = &tl.tw[(size_t)c * TP];
    vf a{}, b{};  // (two chains)
    for (int i = 0; i < NV; i += 2) {
      a += *(const vf*)(tw + VW * i) * (*(const vf*)(x + VW * i) - *(const vf*)(m + VW * i));
      b += *(const vf*)(tw + VW * (i + 1)) * (*(const vf*)(x + VW * (i + 1)) - *(const vf*)(m + VW * (i + 1)));
    }
    out[c] = a + b;
  }
}

// Fold a row of TP per-pixel values into one VW-lane partial (no horizontal reduction per tile).
inline void fold_row(vf& acc, const float* r) {
  for (int i = 0; i < NV; ++i) acc += *(const vf*)(r + VW * i);
}

// accumulate_stats of a softmax map: the three sums in registers over the tile's NV vectors, each going
// on from its partial. UNIT_W: every w is 1 (Tile::unit_weights), w·s is s (one operation fewer of 6).
// SHIFTED (z null, activate_map): lse is the log of the shifted sum alone and the CE sum takes Σ tw·lse;
// the caller subtracts the members' stage_ce_sums.
template <bool UNIT_W, bool SHIFTED>
void softmax_stats(const Problem& pr, const float* __restrict z, Tile& tl, vf* __restrict lanes) {
  const int C = (int)pr.classes;
  const float* __restrict s = tl.probs;
  const float* __restrict w = tl.w;
  for (int c = 0; c < C; ++c) {
    const size_t o = (size_t)c * TP;
    vf ce = lanes[c], in = lanes[C + c], zs = lanes[2 * C + c];
    for (int i = 0; i < NV; ++i) {
      const vf sv = *(const vf*)(s + o + VW * i) * *(const vf*)(tl.inv + VW * i);
      const vf wsv = UNIT_W ? sv : *(const vf*)(w + VW * i) * sv;
      if (SHIFTED)
        ce += *(const vf*)(&tl.tw[o + VW * i]) * *(const vf*)(tl.lse + VW * i);
      else
        ce += *(const vf*)(&tl.tw[o + VW * i]) * (*(const vf*)(tl.lse + VW * i) - *(const vf*)(z + o + VW * i));
      in += wsv * *(const vf*)(&tl.t[o + VW * i]);
      zs += pr.q == 2 ? wsv * sv : wsv;
    }
    lanes[c] = ce;
    lanes[C + c] = in;
    lanes[2 * C + c] = zs;
  }
}

// Accumulate the sums of one map (z, tl.s) into VW-lane partials: lanes[c] (ce), lanes[C + c]
// (inter), lanes[2C + c] (zsum). The caller folds them into double every FLUSH_TILES tiles. z null: a
// softmax from the stages' exponentials (activate_map) over the n stages `stages`, whose stage_ce_sums
// complete the CE sums.
void accumulate_stats(const Problem& pr, const float* __restrict z, Tile& tl, vf* __restrict lanes,
                      const int32_t* stages = nullptr, int n = 0) {
  const int C = (int)pr.classes;
  const float* __restrict s = tl.probs;
  const float* __restrict w = tl.w;
  if (pr.sigmoid) {
    alignas(ALIGN) float ce_p[TP], i_p[TP], z_p[TP];
    for (int c = 0; c < C; ++c) {
      const float* __restrict zr = z + (size_t)c * TP;
      const float* __restrict sr = s + (size_t)c * TP;
      const float* __restrict tr = &tl.t[(size_t)c * TP];
      for (int p = 0; p < TP; ++p) {
        const float bce = std::max(zr[p], 0.0f) - zr[p] * tr[p] + fast_log1p(fast_exp(-std::fabs(zr[p])));
        ce_p[p] = w[p] * bce;
        i_p[p] = w[p] * sr[p] * tr[p];
        z_p[p] = w[p] * (pr.q == 2 ? sr[p] * sr[p] : sr[p]);
      }
      fold_row(lanes[c], ce_p);
      fold_row(lanes[C + c], i_p);
      fold_row(lanes[2 * C + c], z_p);
    }
    return;
  }
  if (z) {
    if (tl.unit_weights)
      softmax_stats<true, false>(pr, z, tl, lanes);
    else
      softmax_stats<false, false>(pr, z, tl, lanes);
    return;
  }
  if (tl.unit_weights)
    softmax_stats<true, true>(pr, z, tl, lanes);
  else
    softmax_stats<false, true>(pr, z, tl, lanes);
  for (int j = 0; j < n; ++j) {
    const vf* __restrict sj = (const vf*)&tl.ce_stage[(size_t)stages[j] * C * VW];
    for (int c = 0; c < C; ++c) lanes[c] -= sj[c];
  }
}

// The forward's work on a loaded tile (load_tile, target_stats): every map built, activated and its sums
// accumulated into its VW-lane partials (3C per map, map u's at lanes + u·3C; accumulate_stats).
// The maps made by_product build no logits (activate_map, accumulate_stats).
inline void forward_maps(const Problem& pr, const Layout& ly, Tile& tl, vf* lanes) {
  if (ly.add_by_product)
    for (int j = 0; j < ly.L; ++j) {
      stage_exp(pr, tl, j);
      stage_ce_sums(pr, tl, j);
    }
  for (int u = 0; u < ly.M; ++u) {
    const bool product = by_product(pr, ly, u);
    const float* z = activate_map(pr, ly, u, product ? nullptr : build_map(pr, ly, u, tl), tl, true);
    int n;
    const int32_t* stages = map_stages(pr, ly, u, n);
    accumulate_stats(pr, z, tl, lanes + (size_t)u * 3 * ly.C, stages, n);
  }
}

}  // namespace
