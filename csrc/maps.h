// Building map u of a tile from its stages: orig, add, mult, cat (1x1 conv), awf (attention).
#pragma once

#include "layout.h"

namespace {

// NB output classes c.. of a cat map (a 1x1 conv over the members' classes) per pass, BLOCK_NV pixel
// vectors at a time: each member vector is loaded once for the NB rows.
template <int NB>
inline void cat_rows(const float* W, const float* bias, int c, int k, int C, const int32_t* mem, Tile& tl,
                     float* z) {
  const int64_t K = (int64_t)k * C;
  for (int h = 0; h < NV; h += BLOCK_NV) {
    const int o = VW * h;
    Vecs<BLOCK_NV> acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = row_splat<BLOCK_NV>(bias[c + b]);
    for (int j = 0; j < k; ++j)
      for (int c2 = 0; c2 < C; ++c2) rows_fma<NB>(acc, W + c * K + j * C + c2, K, tl.xs(mem[j], c2) + o);
    for (int b = 0; b < NB; ++b) row_store(z + (size_t)(c + b) * TP + o, acc[b]);
  }
}

// The elementwise maps (add, mult) and their adjoints run over their k members in one pass, with k known
// at compile time up to MEMBER_UNROLL (L ≤ 5): the member rows' pointers in registers, the loop over them
// unrolled. A loop over a runtime k inside the pass (each member's stage and address loaded per vector) ran
// 2–3× slower than that for k ≥ 3 (make cycles: an add adjoint of k = 3 19–20 slots per class vector against
// 7, benchmarks/CPU_LOG.md); it is left to larger subsets (L ≥ 6). with_members(k, f, g):
// f(integral_constant<k>) for 2 ≤ k ≤ MEMBER_UNROLL, else g().
constexpr int MEMBER_UNROLL = 5;
template <class F, class G>
inline void with_members(int k, F&& f, G&& g) {
  if (k > MEMBER_UNROLL) return g();
  remainder_block<MEMBER_UNROLL>(k, 0, [&](auto kk, int) {
    if constexpr (kk() >= 2) f(kk);
  });
}

// z = x_0 ∘ x_1 ∘ … over C×TP (∘: + or ⊙), in member order ((x_0 ∘ x_1) ∘ x_2 ...): each z vector written once,
// and its max over classes kept in registers on the way (into tl.zmax: the softmax's max pass, Tile::zmax).
template <int K, bool MULT>
inline void fold_members(Tile& tl, const int32_t* mem, int C, float* __restrict z) {
  const float* x[K];
  for (int j = 0; j < K; ++j) x[j] = tl.xs(mem[j], 0);
  auto fold = [&](size_t e) {
    vf v = *(const vf*)(x[0] + e);
    for (int j = 1; j < K; ++j) v = MULT ? v * *(const vf*)(x[j] + e) : v + *(const vf*)(x[j] + e);
    *(vf*)(z + e) = v;
    return v;
  };
  vf m[NV];
  for (int i = 0; i < NV; ++i) m[i] = fold(VW * i);
  for (int c = 1; c < C; ++c)
    for (int i = 0; i < NV; ++i) m[i] = vmax(fold((size_t)c * TP + VW * i), m[i]);
  for (int i = 0; i < NV; ++i) *(vf*)(tl.zmax + VW * i) = m[i];
  tl.zmax_ready = true;
}
template <bool MULT>
inline void fold_members_loop(Tile& tl, const int32_t* mem, int k, int C, float* __restrict z) {
  for (int e = 0; e < C * TP; e += VW) {
    vf v = *(const vf*)(tl.xs(mem[0], 0) + e);
    for (int j = 1; j < k; ++j) v = MULT ? v * *(const vf*)(tl.xs(mem[j], 0) + e) : v + *(const vf*)(tl.xs(mem[j], 0) + e);
    *(vf*)(z + e) = v;
  }
}

// An awf map's mix z_c = Σ_j α_j x_{s_j, c} (C×TP) from its K attention weights al (K×TP): a group of pixel
// vectors at a time (weights_group) with their K weights in registers, so each class loads only the members'
// vectors (a loop over classes that reloaded the weights with every member vector: 2 loads per FMA, make
// cycles 5.8 slots per class vector for k = 2's 2 FMAs). Each z_c sums in member order, as before.
// The max over classes rides along in registers (into tl.zmax, as fold_members).
template <int K>
inline void awf_mix(const float* __restrict al, const int32_t* mem, int C, Tile& tl, float* __restrict z) {
  constexpr int G = weights_group(K);
  const float* x[K];
  for (int j = 0; j < K; ++j) x[j] = tl.xs(mem[j], 0);
  for (int i0 = 0; i0 < NV; i0 += G) {
    vf a[K][G], m[G];
    for (int j = 0; j < K; ++j)
      for (int i = 0; i < G; ++i) a[j][i] = *(const vf*)(al + (size_t)j * TP + VW * (i0 + i));
    auto mix = [&](int c, int i) {
      const size_t o = (size_t)c * TP + VW * (i0 + i);
      vf acc = a[0][i] * *(const vf*)(x[0] + o);
      for (int j = 1; j < K; ++j) acc += a[j][i] * *(const vf*)(x[j] + o);
      *(vf*)(z + o) = acc;
      return acc;
    };
    for (int i = 0; i < G; ++i) m[i] = mix(0, i);
    for (int c = 1; c < C; ++c)
      for (int i = 0; i < G; ++i) m[i] = vmax(mix(c, i), m[i]);
    for (int i = 0; i < G; ++i) *(vf*)(tl.zmax + VW * (i0 + i)) = m[i];
  }
  tl.zmax_ready = true;
}

// Build map u of the current tile. Returns a pointer to its C×TP logits (either a stage's
// buffer for OP_ORIG, or tl.z). For OP_AWF, tl.alpha holds the k×TP attention weights. tl.zmax_ready: whether
// tl.zmax holds their max over classes (add, mult and awf maps of at most MEMBER_UNROLL members).
const float* build_map(const Problem& pr, const Layout& ly, int u, Tile& tl) {
  const int C = ly.C;
  const int op = pr.map_op[u], arg = pr.map_arg[u];
  tl.zmax_ready = false;
  if (op == OP_ORIG) return tl.xs(arg, 0);
  const int k = pr.subset_size[arg];
  const int32_t* mem = pr.subset_members + ly.sub_start[arg];
  float* __restrict z = tl.z.data();
  switch (op) {
    case OP_ADD:
    case OP_MULT: {
      if (op == OP_ADD)
        with_members(k, [&](auto kk) { fold_members<kk(), false>(tl, mem, C, z); },
                     [&] { fold_members_loop<false>(tl, mem, k, C, z); });
      else
        with_members(k, [&](auto kk) { fold_members<kk(), true>(tl, mem, C, z); },
                     [&] { fold_members_loop<true>(tl, mem, k, C, z); });
      break;
    }
    case OP_CAT: {
      const float* W = pr.cat_w + ly.cat_w_off[arg];
      const float* bias = pr.cat_b + ly.cat_b_off[arg];
      for_row_blocks<CAT_BLOCK>(C, [&](auto nb, int c) { cat_rows<nb()>(W, bias, c, k, C, mem, tl, z); });
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
      for (int i = 0; i < NV; ++i) {  // α = softmax over the k scores, per pixel vector
        const size_t o = (size_t)VW * i;
        vf m = *(const vf*)(a + o), sum{};
        for (int r = 1; r < k; ++r) m = vmax(*(const vf*)(a + (size_t)r * TP + o), m);
        for (int r = 0; r < k; ++r) {
          const vf e = exp_nonpositive_v(*(const vf*)(a + (size_t)r * TP + o) - m);
          *(vf*)(al + (size_t)r * TP + o) = e;
          sum += e;
        }
        const vf inv = reciprocal_v(sum);
        for (int r = 0; r < k; ++r) *(vf*)(al + (size_t)r * TP + o) *= inv;
      }
      with_members(k, [&](auto kk) { awf_mix<kk()>(al, mem, C, tl, z); }, [&] {
        for (int c = 0; c < C; ++c) {
          Row acc = row_splat(0.0f);
          for (int j = 0; j < k; ++j) row_fma(acc, al + (size_t)j * TP, tl.xs(mem[j], c));
          row_store(z + (size_t)c * TP, acc);
        }
      });
      break;
    }
  }
  return z;
}

}  // namespace
