// Where things live: the packed map/parameter layout, the work items (bands of output rows) and
// the per-thread tile buffers.
#pragma once

#include "common.h"
#include "simd.h"

namespace {

// ---- derived layout ---------------------------------------------------------------------------
struct Layout {
  int L, C, M, S;
  std::vector<int> sub_start;        // offset of each subset into subset_members
  std::vector<int64_t> cat_w_off, cat_b_off, awf_v_off, awf_c_off;
  int64_t cat_w_n = 0, cat_b_n = 0, awf_v_n = 0, awf_c_n = 0;
  int max_k = 1;
  // Softmax of the add maps from their members' exponentials (stats.h, activate_map): on when the
  // members' exps are computed anyway (the original maps are in the plan) or there are more add maps
  // than stages.
  bool add_by_product = false;
  explicit Layout(const Problem& p) : L(p.num_stages), C((int)p.classes), M(p.num_maps), S(p.num_subsets) {
    int n_add = 0;
    bool has_orig = false;
    for (int u = 0; u < M; ++u) {
      n_add += p.map_op[u] == OP_ADD;
      has_orig |= p.map_op[u] == OP_ORIG;
    }
    add_by_product = !p.sigmoid && n_add > 0 && (has_orig || n_add > L);
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

constexpr int MIX_ROW = TP + 32;  // floats per class in Tile::mix (below)

// Per-thread tile buffers.
struct Tile {
  int L, C, n = 0;                 // n valid pixels in the current tile
  aligned_vector<float> x, t, tw, z, s, g, gx, score, alpha, dalpha;  // tw = w·t (forward: target_stats)
  aligned_vector<float> ex, emax, esum;  // per stage: exp(x - max_c x) (C×TP), the max and Σ_c (TP), once per tile
  std::vector<char> ex_ready;      // ... computed yet for this tile (load_tile resets it)
  aligned_vector<float> ce_stage;  // forward, per stage and class: VW lanes of Σ_pixels tw_c·(x_c − max_c x)
                                   // over the tile (stage_ce_sums; the CE sums of the maps made by_product)
  aligned_vector<float> mix;             // C×MIX_ROW: a segment's mixed native rows (interpolate_stage) or its
                                         // column sums (scatter_stage): at most TP + 1 columns, and the permute's
                                         // second table register reads 32 floats from the last
  const float* probs = nullptr;    // the current map's activation: tl.s, or (an original map) its stage's ex
  std::vector<const float*> cat_inputs;  // the backward's current cat map: its k·C input rows (x rows of its members)
  alignas(ALIGN) float w[TP];
  bool unit_weights = false;       // every w is 1 (a full tile, nothing ignored, no pixel weights): the
                                   // statistics and dL/dz skip their multiplications by w (w·a = a exactly)
  alignas(ALIGN) float lse[TP];
  alignas(ALIGN) float inv[TP];   // softmax: probs holds exp(z - max); inv = 1 / Σ_c
  alignas(ALIGN) float zmax[TP];  // the max over classes of the logits build_map made last, where zmax_ready:
  bool zmax_ready = false;        // taken while they were written (a mult or add map, an awf map: maps.h),
                                  // so that the softmax skips its max pass (activate)
  Tile(int L_, int C_, int max_k) : L(L_), C(C_), x((size_t)L_ * C_ * TP), t((size_t)C_ * TP), tw((size_t)C_ * TP),
      z((size_t)C_ * TP), s((size_t)C_ * TP), g((size_t)C_ * TP), gx((size_t)L_ * C_ * TP),
      score((size_t)max_k * TP), alpha((size_t)max_k * TP), dalpha((size_t)max_k * TP),
      ex((size_t)L_ * C_ * TP), emax((size_t)L_ * TP), esum((size_t)L_ * TP), ex_ready((size_t)L_, 0),
      ce_stage((size_t)L_ * C_ * VW),
      mix((size_t)C_ * MIX_ROW), cat_inputs((size_t)max_k * C_) {}
  float* xs(int stage, int c) { return &x[((size_t)stage * C + c) * TP]; }
  float* gxs(int stage, int c) { return &gx[((size_t)stage * C + c) * TP]; }
  float* exs(int stage) { return &ex[(size_t)stage * C * TP]; }
  float* mixes(int c) { return &mix[(size_t)c * MIX_ROW]; }
};

}  // namespace
