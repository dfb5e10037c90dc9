// The backward's adjoints: dL/dz of a map from the statistic gradients, and its push through
// the map's operator into stage gradients and parameter partials.
#pragma once

#include "stats.h"

namespace {

// The adjoint of a mult map of K members (z = Π_j x_j) at one class vector, offset e of the members' rows x
// and gradient rows gx: gx_j += g · Π_{i≠j} x_i. K = 2: g times the other member (2 FMAs). K ≥ 3: the
// members' vectors, the prefix products (from g) and the suffix products in registers, 3K − 3 operations
// (benchmarks/floor.py counts 2(K − 1)) where a pass per member copied g, multiplied it by K − 1 rows and
// added it to a gradient row (make cycles: synapse2d's 11 mult maps, k = 2..4, backward 736 -> 450 slots).
template <int K>
inline void mult_adjoint_at(vf gv, const float* const* x, float* const* gx, size_t e) {
  if constexpr (K == 2) {
    const vf x0 = *(const vf*)(x[0] + e), x1 = *(const vf*)(x[1] + e);
    *(vf*)(gx[0] + e) += gv * x1;
    *(vf*)(gx[1] + e) += gv * x0;
  } else {
    vf xv[K], suffix[K];  // suffix[j] = Π_{i>j} x_i (j < K − 1)
    for (int j = 0; j < K; ++j) xv[j] = *(const vf*)(x[j] + e);
    suffix[K - 2] = xv[K - 1];
    for (int j = K - 3; j >= 0; --j) suffix[j] = suffix[j + 1] * xv[j + 1];
    vf prefix = gv;  // g · Π_{i<j} x_i
    for (int j = 0; j < K - 1; ++j) {
      *(vf*)(gx[j] + e) += prefix * suffix[j];
      prefix *= xv[j];
    }
    *(vf*)(gx[K - 1] + e) += prefix;
  }
}

// dL/dz_u of a softmax map (C×TP) into tl.g from the statistic gradients of map u, sample b (C each):
// g_c = w (s_c (gs_c − dot + a) − gce_c t_c) with gs_c = gi_c t_c + gz_c q s_c^(q−1), dot = Σ_c gs_c s_c,
// a = Σ_c gce_c t_c. Regrouped around y_c = gce_c − gi_c s_c: a − dot = Σ_c t_c y_c − Σ_c gz_c q s_c^q =: A
// and g_c = w (s_c (q gz_c s_c^(q−1) + A) − t_c y_c) — 5 operations per class vector for A, 5 for g (with
// w; 6 while it recomputed s_c, 7 before that). One pass over the classes for the two sums of A (in
// registers) that also stores the normalized s_c into g, one that reads it back, recomputes y_c and
// overwrites it with g_c. PIXEL_GROUP pixel vectors go through each class together: that many independent
// chains for the sums, not one per vector (benchmarks/cpu_cycles.cpp: 0.87 of this function's cycles);
// each class's factors are broadcast once for the group (Q2: q = 2; UNIT_W: every w is 1,
// Tile::unit_weights, and g skips its multiplication by w).
// K > 0: g_c is not stored but pushed into the gradient rows of the K stages `stages` — the whole adjoint of
// an original map (K = 1) or an add map (K members: added), or (MULT) of a mult map (mult_adjoint_at), without
// g's store and a pass that reads it back.
template <bool Q2, bool UNIT_W, int K, bool MULT>
void softmax_map_grad(const Problem& pr, Tile& tl, const float* __restrict gce, const float* __restrict gi,
                      const float* __restrict qgz, const int32_t* stages) {
  const int C = (int)pr.classes;
  const float* xm[K > 0 ? K : 1];  // the stages' logits and gradient rows
  float* gx[K > 0 ? K : 1];
  for (int j = 0; j < K; ++j) {
    xm[j] = tl.xs(stages[j], 0);
    gx[j] = tl.gxs(stages[j], 0);
  }
  const float* __restrict s = tl.probs;
  const float* __restrict t = tl.t.data();
  const float* __restrict w = tl.w;
  const float* __restrict inv = tl.inv;
  float* __restrict g = tl.g.data();
  struct Factors { vf gi, gz, gce; };  // gz: q·gz_c (map_grad)
  auto factors = [&](int c) { return Factors{splat(gi[c]), splat(qgz[c]), splat(gce[c])}; };
  for (int i0 = 0; i0 < NV; i0 += PIXEL_GROUP) {
    vf iv[PIXEL_GROUP], ty[PIXEL_GROUP], zq[PIXEL_GROUP];  // A = Σ t·y − Σ q·gz·s^q
    for (int i = 0; i < PIXEL_GROUP; ++i) {
      iv[i] = *(const vf*)(inv + VW * (i0 + i));
      ty[i] = zq[i] = vf{};
    }
    for (int c = 0; c < C; ++c) {
      const Factors f = factors(c);
      for (int i = 0; i < PIXEL_GROUP; ++i) {
        const size_t o = (size_t)c * TP + VW * (i0 + i);
        const vf sv = *(const vf*)(s + o) * iv[i];
        *(vf*)(g + o) = sv;  // (the second pass reads s_c from here and overwrites it with g_c)
        ty[i] += *(const vf*)(t + o) * (f.gce - f.gi * sv);
        zq[i] += Q2 ? (f.gz * sv) * sv : f.gz * sv;
      }
    }
    vf A[PIXEL_GROUP];
    for (int i = 0; i < PIXEL_GROUP; ++i) A[i] = ty[i] - zq[i];
    for (int c = 0; c < C; ++c) {
      const Factors f = factors(c);
      for (int i = 0; i < PIXEL_GROUP; ++i) {
        const size_t o = (size_t)c * TP + VW * (i0 + i);
        const vf sv = *(const vf*)(g + o);
        const vf y = f.gce - f.gi * sv;
        const vf x = Q2 ? f.gz * sv + A[i] : f.gz + A[i];
        vf gv = sv * x - *(const vf*)(t + o) * y;
        if (!UNIT_W) gv *= *(const vf*)(w + VW * (i0 + i));
        if constexpr (K == 0)
          *(vf*)(g + o) = gv;
        else if constexpr (MULT)
          mult_adjoint_at<K>(gv, xm, gx, o);
        else
          for (int j = 0; j < K; ++j) *(vf*)(gx[j] + o) += gv;
      }
    }
  }
}

// The operator adjoint map_grad does itself (fused_adjoint): none (n = 0), or map u's stages (n of them) and
// whether it multiplies (a mult map) or adds (an original or add map).
struct FusedAdjoint {
  const int32_t* stages = nullptr;
  int n = 0;
  bool mult = false;
};

// dL/dz_u (C×TP) into tl.g from the statistic gradients of map u, sample b (C each): gce, gi and
// qgz = q·∂L/∂zsum (scaled once per backward call, so that each class's factor is a broadcast from memory).
// With fa's n ≤ MEMBER_UNROLL stages (an original, add or mult map's, softmax): pushed into their gradient rows
// instead (softmax_map_grad's K; the map's whole adjoint) — returns whether it did.
bool map_grad(const Problem& pr, Tile& tl, const float* gce, const float* gi, const float* qgz,
              const FusedAdjoint& fa = {}) {
  if (!pr.sigmoid) {
    const bool q2 = pr.q == 2, unit = tl.unit_weights;  // (unit weights: no multiplication by w, exact)
    auto run = [&](auto kk, auto mult) {
      constexpr int K = kk();
      constexpr bool M = mult();
      if (q2 && unit)
        softmax_map_grad<true, true, K, M>(pr, tl, gce, gi, qgz, fa.stages);
      else if (q2)
        softmax_map_grad<true, false, K, M>(pr, tl, gce, gi, qgz, fa.stages);
      else if (unit)
        softmax_map_grad<false, true, K, M>(pr, tl, gce, gi, qgz, fa.stages);
      else
        softmax_map_grad<false, false, K, M>(pr, tl, gce, gi, qgz, fa.stages);
    };
    if (fa.stages && fa.n <= MEMBER_UNROLL) {
      remainder_block<MEMBER_UNROLL>(fa.n, 0, [&](auto kk, int) {
        if (!fa.mult)
          run(kk, std::false_type{});
        else if constexpr (kk() >= 2)
          run(kk, std::true_type{});
      });
      return true;
    }
    run(std::integral_constant<int, 0>{}, std::false_type{});
    return false;
  }
  const int C = (int)pr.classes;
  const float* __restrict s = tl.probs;
  const float* __restrict t = tl.t.data();
  float* __restrict g = tl.g.data();
  const float* __restrict w = tl.w;
  for (int c = 0; c < C; ++c) {  // sigmoid
    const float* __restrict sr = s + (size_t)c * TP;
    const float* __restrict tr = t + (size_t)c * TP;
    float* __restrict gr = g + (size_t)c * TP;
    const float gic = gi[c], gzc = qgz[c], gcec = gce[c];
    for (int p = 0; p < TP; ++p) {
      const float gs = gic * tr[p] + gzc * (pr.q == 2 ? sr[p] : 1.0f);
      gr[p] = w[p] * (gs * sr[p] * (1.0f - sr[p]) + gcec * (sr[p] - tr[p]));
    }
  }
  return false;
}

// The cat adjoint into NB consecutive input rows (member j, classes c2..): gx += Σ_c W[c, j·C + c2] g_c,
// BLOCK_NV pixel vectors at a time, each g_c vector loaded once for the NB rows.
template <int NB>
inline void cat_adjoint_rows(const float* W, int K, int j, int c2, int C, const int32_t* mem, const float* g,
                             Tile& tl) {
  for (int h = 0; h < NV; h += BLOCK_NV) {
    const int o = VW * h;
    Vecs<BLOCK_NV> acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = row_load<BLOCK_NV>(tl.gxs(mem[j], c2 + b) + o);
    for (int c = 0; c < C; ++c) rows_fma<NB>(acc, W + (size_t)c * K + j * C + c2, 1, g + (size_t)c * TP + o);
    for (int b = 0; b < NB; ++b) row_store(tl.gxs(mem[j], c2 + b) + o, acc[b]);
  }
}

// The cat weight (and bias) gradients of NB consecutive output classes c..: dW[c, q] += <g_c, x_q> for
// every input row q = (member j, class c2). DW_XBLOCK = 1 (AVX-512): the NB g rows held in registers, so
// each x row is loaded once for them. Otherwise NB × NQ sums in registers over the tile's vectors for
// NQ input rows q0.. at a time, each loaded g and x vector feeding NQ or NB of them.
// xrows: the map's K input rows (a pointer each: no division by C per block).
template <int NB, int NQ>
inline void cat_weight_grad_block(const float* g, int c, int q0, int K, const float* const* xrows, vf* dW) {
  const float* x[NQ];
  for (int q = 0; q < NQ; ++q) x[q] = xrows[q0 + q];
  vf acc[NB][NQ] = {};
  for (int i = 0; i < NV; ++i) {
    vf gv[NB];
    for (int b = 0; b < NB; ++b) gv[b] = *(const vf*)(g + (size_t)(c + b) * TP + VW * i);
    for (int q = 0; q < NQ; ++q) {
      const vf xv = *(const vf*)(x[q] + VW * i);
      for (int b = 0; b < NB; ++b) acc[b][q] += gv[b] * xv;
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < NQ; ++q) dW[(size_t)(c + b) * K + q0 + q] += acc[b][q];
}

// xrows (DW_XBLOCK > 1): the map's k·C input rows, made once per map by op_backward.
template <int NB>
inline void cat_weight_grad_rows(const float* g, int c, int k, int C, const int32_t* mem,
                                 const float* const* xrows, vf* dW, vf* db, Tile& tl) {
  const int K = k * C;
  if constexpr (DW_XBLOCK > 1) {
    for (int b = 0; b < NB; ++b) db[c + b] += row_sum(row_load(g + (size_t)(c + b) * TP));
    int q0 = 0;
    for (; q0 + DW_XBLOCK <= K; q0 += DW_XBLOCK)
      cat_weight_grad_block<NB, DW_XBLOCK>(g, c, q0, K, xrows, dW);
    remainder_block<DW_XBLOCK - 1>(K - q0, q0, [&](auto nq, int q) {
      cat_weight_grad_block<NB, nq()>(g, c, q, K, xrows, dW);
    });
    return;
  }
  Row grow[NB];
  for (int b = 0; b < NB; ++b) {
    grow[b] = row_load(g + (size_t)(c + b) * TP);
    db[c + b] += row_sum(grow[b]);
  }
  for (int j = 0; j < k; ++j)
    for (int c2 = 0; c2 < C; ++c2) {
      const Row xr = row_load(tl.xs(mem[j], c2));
      for (int b = 0; b < NB; ++b) {
        vf& d = dW[(size_t)(c + b) * K + j * C + c2];
        vf r = d;
        for (int i = 0; i < NV; ++i) r += grow[b].v[i] * xr.v[i];
        d = r;
      }
    }
}

// The adjoint of an add map of K members (maps.h, with_members): g added to every member's gradient rows in
// one pass over g.
template <int K>
inline void add_adjoint(const float* __restrict g, const int32_t* mem, int C, Tile& tl) {
  float* gx[K];
  for (int j = 0; j < K; ++j) gx[j] = tl.gxs(mem[j], 0);
  for (int e = 0; e < C * TP; e += VW) {
    const vf gv = *(const vf*)(g + e);
    for (int j = 0; j < K; ++j) *(vf*)(gx[j] + e) += gv;
  }
}

// The adjoint of a mult map of K members (z = Π_j x_j) in one pass over g (mult_adjoint_at; a softmax map's
// is fused into map_grad). Larger subsets than MEMBER_UNROLL: the loop in op_backward (K(K − 1) operations,
// one pass).
template <int K>
inline void mult_adjoint(const float* __restrict g, const int32_t* mem, int C, Tile& tl) {
  const float* x[K];
  float* gx[K];
  for (int j = 0; j < K; ++j) {
    x[j] = tl.xs(mem[j], 0);
    gx[j] = tl.gxs(mem[j], 0);
  }
  for (int e = 0; e < C * TP; e += VW) mult_adjoint_at<K>(*(const vf*)(g + e), x, gx, e);
}

// The attention weights' gradients of an awf map of K members, dα_j = <g, x_{s_j}> over classes (K×TP, into
// dal): a group of pixel vectors at a time (weights_group) with the K sums in registers, so each g vector is
// loaded once for the K members (a pass per member loaded it K times: 2 loads per FMA). Each dα_j sums in
// class order, as before.
template <int K>
inline void awf_weight_grads(const float* __restrict g, const int32_t* mem, int C, Tile& tl, float* __restrict dal) {
  constexpr int G = weights_group(K);
  const float* x[K];
  for (int j = 0; j < K; ++j) x[j] = tl.xs(mem[j], 0);
  for (int i0 = 0; i0 < NV; i0 += G) {
    vf d[K][G] = {};
    for (int c = 0; c < C; ++c) {
      const size_t o = (size_t)c * TP + VW * i0;
      for (int i = 0; i < G; ++i) {
        const vf gv = *(const vf*)(g + o + VW * i);
        for (int j = 0; j < K; ++j) d[j][i] += gv * *(const vf*)(x[j] + o + VW * i);
      }
    }
    for (int j = 0; j < K; ++j)
      for (int i = 0; i < G; ++i) *(vf*)(dal + (size_t)j * TP + VW * (i0 + i)) = d[j][i];
  }
}

// Push tl.g (dL/dz_u) through the operator of map u into tl.gx and the parameter partials.
// dparams: one VW-lane partial per packed parameter (per thread, folded into double by the caller).
void op_backward(const Problem& pr, const Layout& ly, int u, Tile& tl, vf* dparams) {
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
      with_members(k, [&](auto kk) { add_adjoint<kk()>(g, mem, C, tl); }, [&] {
        for (int e = 0; e < C * TP; e += VW) {
          const vf gv = *(const vf*)(g + e);
          for (int j = 0; j < k; ++j) *(vf*)(tl.gxs(mem[j], 0) + e) += gv;
        }
      });
      break;
    case OP_MULT:
      with_members(k, [&](auto kk) { mult_adjoint<kk()>(g, mem, C, tl); }, [&] {
        for (int e = 0; e < C * TP; e += VW) {  // d/dz_j = g · Π_{i≠j} z_i (no division)
          const vf gv = *(const vf*)(g + e);
          for (int j = 0; j < k; ++j) {
            vf p = gv;
            for (int i = 0; i < k; ++i)
              if (i != j) p *= *(const vf*)(tl.xs(mem[i], 0) + e);
            *(vf*)(tl.gxs(mem[j], 0) + e) += p;
          }
        }
      });
      break;
    case OP_CAT: {
      const float* W = pr.cat_w + ly.cat_w_off[arg];
      vf* dW = dparams + ly.cat_w_off[arg];
      vf* db = dparams + ly.cat_w_n + ly.cat_b_off[arg];
      const float** xrows = tl.cat_inputs.data();
      if constexpr (DW_XBLOCK > 1)
        for (int j = 0, q = 0; j < k; ++j)
          for (int c2 = 0; c2 < C; ++c2) xrows[q++] = tl.xs(mem[j], c2);
      for_row_blocks<DW_BLOCK>(C, [&](auto nb, int c) {
        cat_weight_grad_rows<nb()>(g, c, k, C, mem, xrows, dW, db, tl);
      });
      for (int j = 0; j < k; ++j)
        for_row_blocks<CAT_BLOCK>(C, [&](auto nb, int c2) { cat_adjoint_rows<nb()>(W, K, j, c2, C, mem, g, tl); });
      break;
    }
    case OP_AWF: {
      const float* V = pr.awf_v + ly.awf_v_off[arg];
      vf* dV = dparams + ly.cat_w_n + ly.cat_b_n + ly.awf_v_off[arg];
      vf* dc = dparams + ly.cat_w_n + ly.cat_b_n + ly.awf_v_n + ly.awf_c_off[arg];
      const float* __restrict al = tl.alpha.data();
      float* __restrict dal = tl.dalpha.data();
      with_members(k, [&](auto kk) { awf_weight_grads<kk()>(g, mem, C, tl, dal); }, [&] {
        for (int j = 0; j < k; ++j)  // dα_j = <g, z_{s_j}> over classes (PIXEL_GROUP vectors side by side)
          for (int i0 = 0; i0 < NV; i0 += PIXEL_GROUP) {
            vf d[PIXEL_GROUP] = {};
            for (int c = 0; c < C; ++c)
              for (int i = 0; i < PIXEL_GROUP; ++i) {
                const size_t o = (size_t)VW * (i0 + i);
                d[i] += *(const vf*)(g + (size_t)c * TP + o) * *(const vf*)(tl.xs(mem[j], c) + o);
              }
            for (int i = 0; i < PIXEL_GROUP; ++i) *(vf*)(dal + (size_t)j * TP + VW * (i0 + i)) = d[i];
          }
      });
      // The scores' gradient da = α ⊙ (dα − <α, dα>), as da_j = α_j Σ_i α_i (dα_j − dα_i) — the same where
      // Σ α = 1, but without the rounding of Σ α, which the first form multiplies by dα_j: the awf bias
      // gradient sums da over pixels and cancels (tests/test_cpu.py's random configuration 7: its error
      // 2.3e-5 → 1.2e-5 of the float64 value, torch's float32 3.8e-6). Into tl.score (the build's scores).
      float* __restrict da = tl.score.data();
      for (int j = 0; j < k; ++j)
        for (int i0 = 0; i0 < NV; ++i0) {
          const size_t o = (size_t)VW * i0;
          const vf dj = *(const vf*)(dal + (size_t)j * TP + o);
          vf acc{};
          for (int i = 0; i < k; ++i)
            acc += *(const vf*)(al + (size_t)i * TP + o) * (dj - *(const vf*)(dal + (size_t)i * TP + o));
          *(vf*)(da + (size_t)j * TP + o) = *(const vf*)(al + (size_t)j * TP + o) * acc;
        }
      for (int r = 0; r < k; ++r) {  // dV[r, j·C + c2] += <da_r, x_{s_j, c2}>, only j = r when block-diagonal
        const Row darow = row_load(da + (size_t)r * TP);
        dc[r] += row_sum(darow);
        for (int j = 0; j < k; ++j) {
          if (pr.awf_block_diagonal && j != r) continue;
          vf* dVrj = dV + (size_t)r * K + j * C;
          for (int c2 = 0; c2 < C; ++c2) dVrj[c2] = row_dot(darow, tl.xs(mem[j], c2), dVrj[c2]);
        }
      }
      for (int j = 0; j < k; ++j)  // dz_{s_j, c2} += α_j g_c2 + Σ_r V[r, j·C + c2] da_r: one pass over gx
        for (int h = 0; h < NV; h += BLOCK_NV) {
          const int o = VW * h;
          const Vecs<BLOCK_NV> aj = row_load<BLOCK_NV>(al + (size_t)j * TP + o);
          if (pr.awf_block_diagonal) {  // only r = j: da_j in registers beside α_j (each c2 loads gx and g only)
            const Vecs<BLOCK_NV> dj = row_load<BLOCK_NV>(da + (size_t)j * TP + o);
            const float* Vj = V + (size_t)j * K + j * C;
            for (int c2 = 0; c2 < C; ++c2) {
              float* gx = tl.gxs(mem[j], c2) + o;
              const vf v = splat(Vj[c2]);
              for (int i = 0; i < BLOCK_NV; ++i) {
                vf acc = *(const vf*)(gx + VW * i);
                acc += aj.v[i] * *(const vf*)(g + (size_t)c2 * TP + o + VW * i);
                acc += v * dj.v[i];
                *(vf*)(gx + VW * i) = acc;
              }
            }
            continue;
          }
          for (int c2 = 0; c2 < C; ++c2) {
            float* gx = tl.gxs(mem[j], c2) + o;
            Vecs<BLOCK_NV> acc = row_load<BLOCK_NV>(gx);
            for (int i = 0; i < BLOCK_NV; ++i) acc.v[i] += aj.v[i] * *(const vf*)(g + (size_t)c2 * TP + o + VW * i);
            for (int r = 0; r < k; ++r) row_fma(acc, V[(size_t)r * K + j * C + c2], da + (size_t)r * TP + o);
            row_store(gx, acc);
          }
        }
      break;
    }
  }
}


// The operator adjoint map_grad does itself for map u: an original, add or mult map's (its stages); none
// for the other operators (op_backward).
inline FusedAdjoint fused_adjoint(const Problem& pr, const Layout& ly, int u) {
  FusedAdjoint fa;
  const int op = pr.map_op[u];
  if (op == OP_ORIG || op == OP_ADD || op == OP_MULT) {
    fa.stages = map_stages(pr, ly, u, fa.n);
    fa.mult = op == OP_MULT;
  }
  return fa;
}

// The backward's work on a loaded tile (load_tile): the stage gradients tl.gx zeroed, then every map's
// softmax recomputed, its dL/dz from the statistic gradients of sample b of B (gce, gi, qgz: (M, B, C);
// map_grad) and pushed through its operator into tl.gx and the parameter partials (op_backward; an
// original, add or mult map's by map_grad itself).
inline void backward_maps(const Problem& pr, const Layout& ly, Tile& tl, const float* gce, const float* gi,
                          const float* qgz, int64_t B, int64_t b, vf* dparams) {
  std::fill(tl.gx.begin(), tl.gx.end(), 0.0f);
  for (int u = 0; u < ly.M; ++u) {
    const size_t o = ((size_t)u * B + b) * ly.C;
    activate_map(pr, ly, u, backward_builds_logits(pr, ly, u) ? build_map(pr, ly, u, tl) : nullptr, tl, false);
    if (!map_grad(pr, tl, gce + o, gi + o, qgz + o, fused_adjoint(pr, ly, u))) op_backward(pr, ly, u, tl, dparams);
  }
}
}  // namespace
