// Cost of each per-tile function of the fused CPU kernels with the tile in L1, per map kind, in
// vector-FMA slots per class vector (one class's VW pixels): the time of N calls times this core's
// measured vector-FMA rate (csrc's lomix_cpu_vector_fma_rate), divided by the tile's C·TP/VW class
// vectors — the unit benchmarks/floor.py counts operations in, so each number reads against the
// floor's operations per class vector (README, Performance).
//
// Three tables: (1) one map per kind with k = 2 members, each function alone; (2) the whole tile of the
// L = 4 problem (all 48 maps, k = 2..4 as in synapse2d): each map's functions alone, summed per kind,
// against the forward and backward of the tile run as the library runs them (load, every map in
// order) — what the maps cost together before memory, work items and threads; (3) the same maps'
// functions averaged per kind and member count k — a function whose cost grows faster in k than its
// work does shows up here (how the add and mult maps' k(k + 1) passes were found).
//
//     make cycles                      # builds this file against csrc/ (AVX-512) and runs it
//     ./build/cpu_cycles 14            # another class count (default 9)
//     ./build/cpu_cycles 9 1000        # calls per timing (default 100 000; the whole tile: N / 30)
//
// It includes csrc/lomix_cpu.cpp (one translation unit, as the library is built), so it times the
// kernels' own functions, inlined as they are there.
#include "../csrc/lomix_cpu.cpp"

#include <cstdio>
#include <cstdlib>
#include <random>

namespace {

constexpr int L = 4;
const char* const KIND_NAMES[5] = {"orig", "add", "mult", "cat", "awf"};

// A one-tile problem (8x8 pixels per stage, integer targets, Dice q = 2) over the given maps: the L
// original maps, then the ops of each subset (member lists), with random logits and parameters.
struct TileProblem {
  int C;
  std::vector<std::vector<float>> logits;
  std::vector<int64_t> target;
  const void* lp[L];
  int64_t sizes[3 * L];
  std::vector<int32_t> op, arg, subset_size, members;
  std::vector<float> cat_w, cat_b, awf_v, awf_c;
  Problem pr{};

  TileProblem(int classes, const std::vector<std::vector<int32_t>>& subsets, const std::vector<int32_t>& ops)
      : C(classes), logits(L, std::vector<float>((size_t)classes * TP)), target(TP) {
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    for (auto& v : logits)
      for (auto& x : v) x = 2.0f * normal(rng);
    for (auto& y : target) y = (int64_t)(rng() % C);
    size_t nw = 0, nv = 0;
    for (int i = 0; i < L; ++i) {
      lp[i] = logits[i].data();
      sizes[3 * i] = 1, sizes[3 * i + 1] = 8, sizes[3 * i + 2] = 8;
      op.push_back(OP_ORIG), arg.push_back(i);
    }
    for (size_t s = 0; s < subsets.size(); ++s) {
      const int k = (int)subsets[s].size();
      subset_size.push_back(k);
      members.insert(members.end(), subsets[s].begin(), subsets[s].end());
      for (int o : ops) op.push_back(o), arg.push_back((int32_t)s);
      nw += (size_t)C * k * C, nv += (size_t)k * k * C;
    }
    cat_w.resize(nw), cat_b.assign(subsets.size() * C, 0.1f), awf_v.resize(nv), awf_c.assign(nv / C + 1, 0.0f);
    for (auto& x : cat_w) x = 0.2f * normal(rng);
    for (auto& x : awf_v) x = 0.2f * normal(rng);
    pr.batch = 1; pr.classes = C; pr.pixels = TP; pr.num_stages = L; pr.num_maps = (int32_t)op.size();
    pr.num_subsets = (int32_t)subsets.size(); pr.logit_dtype = DT_F32; pr.target_kind = TK_I64; pr.q = 2;
    pr.num_labels = C; pr.num_threads = 1; pr.awf_block_diagonal = 1; pr.spatial_rank = 2;
    pr.out_size[0] = 1; pr.out_size[1] = 8; pr.out_size[2] = 8;
    pr.stage_size = sizes; pr.logits = lp; pr.target = target.data();
    pr.map_op = op.data(); pr.map_arg = arg.data(); pr.subset_size = subset_size.data();
    pr.subset_members = members.data();
    pr.cat_w = cat_w.data(); pr.cat_b = cat_b.data(); pr.awf_v = awf_v.data(); pr.awf_c = awf_c.data();
  }
};

// Best of 3 runs of n calls of f, in vector-FMA slots per class vector of a C-class tile.
template <class F>
double slots(F&& f, int n, int C, double fma_rate) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < n; ++it) {
      f();
      asm volatile("" ::: "memory");
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best * fma_rate / n / ((double)C * TP / VW);
}

// The loaded tile, its buffers and the statistic gradients of a TileProblem, and the cost of each
// function of one map u: build, activate (forward), statistics, activate (backward), dL/dz, adjoint.
struct TileBench {
  const Problem& pr;
  const Layout ly;
  const std::vector<Stage> stages;
  Tile tl;
  aligned_vector<float> lane_buf, param_buf;
  std::vector<float> gce, gi, gz;
  double target_sums[64] = {0};
  ItemError err;

  explicit TileBench(const Problem& p)
      : pr(p), ly(p), stages(make_stages(p)), tl(L, ly.C, ly.max_k),
        lane_buf((size_t)3 * ly.M * ly.C * VW), param_buf((size_t)ly.num_params() * VW),
        gce((size_t)ly.M * ly.C, 0.1f), gi((size_t)ly.M * ly.C, -0.2f), gz((size_t)ly.M * ly.C, 0.05f) {
    load(true);
    for (int j = 0; j < L; ++j) stage_exp(pr, tl, j);  // made once per tile: not charged to one map
  }
  vf* lanes(int u) { return (vf*)lane_buf.data() + (size_t)u * 3 * ly.C; }
  vf* dparams() { return (vf*)param_buf.data(); }
  const float* grad(const std::vector<float>& v, int u) const { return v.data() + (size_t)u * ly.C; }
  void load(bool forward) {
    load_tile(pr, stages, 0, 0, TP, tl, forward, err);
    if (forward) target_stats(pr, tl, target_sums);
  }

  // out: build, activate (forward), statistics, activate (backward), dL/dz, adjoint, and the forward's and
  // backward's totals. A pass's build counts only where it builds logits: not the forward's maps made
  // by_product (their statistics take the stages' CE sums, stage_ce_sums, timed with the stage
  // exponentials), not the backward's without backward_builds_logits. The adjoint is 0 where map_grad did
  // it (an original, add or mult map: part of its dL/dz).
  void costs(int u, int n, double fma_rate, double out[8]) {
    const int C = ly.C;
    int n_stages;
    const int32_t* stages = map_stages(pr, ly, u, n_stages);
    const bool product = by_product(pr, ly, u);
    const float* built = build_map(pr, ly, u, tl);
    out[0] = pr.map_op[u] == OP_ORIG ? 0.0 : slots([&] { built = build_map(pr, ly, u, tl); }, n, C, fma_rate);
    const float* z = activate_map(pr, ly, u, product ? nullptr : built, tl, true);
    out[1] = slots([&] { z = activate_map(pr, ly, u, product ? nullptr : built, tl, true); }, n, C, fma_rate);
    out[2] = slots([&] { accumulate_stats(pr, z, tl, lanes(u), stages, n_stages); }, n, C, fma_rate);
    out[3] = slots([&] { activate_map(pr, ly, u, built, tl, false); }, n, C, fma_rate);
    const FusedAdjoint fused = fused_adjoint(pr, ly, u);
    const auto dl_dz = [&] { return map_grad(pr, tl, grad(gce, u), grad(gi, u), grad(gz, u), fused); };
    const bool adjoint_done = dl_dz();
    out[4] = slots(dl_dz, n, C, fma_rate);
    out[5] = adjoint_done ? 0.0 : slots([&] { op_backward(pr, ly, u, tl, dparams()); }, n, C, fma_rate);
    out[6] = (product ? 0.0 : out[0]) + out[1] + out[2];
    out[7] = (backward_builds_logits(pr, ly, u) ? out[0] : 0.0) + out[3] + out[4] + out[5];
  }
  // The library's per-tile forward and backward (lomix_cpu.cpp), the tile's logits already in L1.
  void forward_tile() {
    load(true);
    forward_maps(pr, ly, tl, lanes(0));
  }
  void backward_tile() {
    load(false);
    backward_maps(pr, ly, tl, gce.data(), gi.data(), gz.data(), 1, 0, dparams());
  }
};

void per_kind_table(int C, int n, double fma_rate) {
  TileProblem tp(C, {{0, 1}}, {OP_ADD, OP_MULT, OP_CAT, OP_AWF});
  TileBench tb(tp.pr);
  std::printf("(1) one map per kind, k = 2\n");
  std::printf("| map | build | activate (forward) | statistics | activate (backward) | dL/dz | adjoint | forward | backward |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (int u = L - 1; u < L + 4; ++u) {  // the last original map, then add, mult, cat, awf
    double c[8];
    tb.costs(u, n, fma_rate, c);
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", KIND_NAMES[tp.op[u]], c[0], c[1],
                c[2], c[3], c[4], c[5], c[6], c[7]);
  }
  const double exps = slots([&] { tb.tl.ex_ready.assign(L, 0); stage_exp(tb.pr, tb.tl, 0); }, n, C, fma_rate);
  const double ce_sums = slots([&] { stage_ce_sums(tb.pr, tb.tl, 0); }, n, C, fma_rate);
  std::printf("(one stage's exponentials, made once per tile and pass: %.1f; its CE sums, forward: %.1f)\n\n", exps,
              ce_sums);
}

void whole_tile_table(int C, int n, double fma_rate) {
  std::vector<std::vector<int32_t>> subsets;  // every subset of the L stages with >= 2 members, by size
  for (int k = 2; k <= L; ++k)
    for (int mask = 1; mask < (1 << L); ++mask)
      if (__builtin_popcount(mask) == k) {
        subsets.emplace_back();
        for (int j = 0; j < L; ++j)
          if (mask >> j & 1) subsets.back().push_back(j);
      }
  TileProblem tp(C, subsets, {OP_ADD, OP_MULT, OP_CAT, OP_AWF});
  TileBench tb(tp.pr);
  const int M = tb.ly.M;
  double fwd[5] = {0}, bwd[5] = {0};
  int count[5] = {0};
  double by_k[5][L + 1][8] = {};  // (kind, k): the six functions, forward, backward, summed over the maps
  int count_k[5][L + 1] = {};
  for (int u = 0; u < M; ++u) {
    double c[8];
    tb.costs(u, n, fma_rate, c);
    const int kind = tp.op[u], k = kind == OP_ORIG ? 1 : tp.subset_size[tp.arg[u]];
    ++count[kind], ++count_k[kind][k];
    fwd[kind] += c[6], bwd[kind] += c[7];
    for (int i = 0; i < 8; ++i) by_k[kind][k][i] += c[i];
  }
  const double exps = slots([&] { tb.tl.ex_ready.assign(L, 0); stage_exp(tb.pr, tb.tl, 0); }, n, C, fma_rate);
  const double ce_sums = tb.ly.add_by_product ? slots([&] { stage_ce_sums(tb.pr, tb.tl, 0); }, n, C, fma_rate) : 0.0;
  const double load_f = slots([&] { tb.load(true); }, n, C, fma_rate);
  const double load_b = slots([&] { tb.load(false); std::fill(tb.tl.gx.begin(), tb.tl.gx.end(), 0.0f); }, n, C, fma_rate);
  const int nt = std::max(1, n / 30);
  const double whole_f = slots([&] { tb.forward_tile(); }, nt, C, fma_rate);
  const double whole_b = slots([&] { tb.backward_tile(); }, nt, C, fma_rate);
  std::printf("(2) the whole tile, L = %d: %d maps (k = 2..%d)\n", L, M, L);
  std::printf("| | maps | forward | backward |\n|---|---|---|---|\n");
  double sum_f = load_f + L * (exps + ce_sums), sum_b = load_b + L * exps;
  for (int kind = 0; kind < 5; ++kind) {
    std::printf("| %s | %d | %.0f | %.0f |\n", KIND_NAMES[kind], count[kind], fwd[kind], bwd[kind]);
    sum_f += fwd[kind], sum_b += bwd[kind];
  }
  std::printf("| tile load (+ target sums; backward: + zeroed gradients) | | %.0f | %.0f |\n", load_f, load_b);
  std::printf("| stage exponentials (forward: + their CE sums) | %d | %.0f | %.0f |\n", L, L * (exps + ce_sums), L * exps);
  std::printf("| sum of the functions alone | | %.0f | %.0f |\n", sum_f, sum_b);
  std::printf("| the tile run as the library runs it | | %.0f | %.0f |\n", whole_f, whole_b);
  const double ns_per_px = (double)C / VW / fma_rate * 1e9;  // one slot per class vector, in ns per pixel
  std::printf("(the whole tile in ns per pixel on one core: forward %.0f, backward %.0f)\n\n", whole_f * ns_per_px,
              whole_b * ns_per_px);
  std::printf("(3) the maps of (2) per kind and member count k, each function alone, mean per map\n");
  std::printf("| map | maps | build | activate (forward) | statistics | activate (backward) | dL/dz | adjoint | forward | backward |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (int kind = 0; kind < 5; ++kind)
    for (int k = 1; k <= L; ++k) {
      const int nk = count_k[kind][k];
      if (!nk) continue;
      std::printf("| %s, k = %d | %d |", KIND_NAMES[kind], k, nk);
      for (int i = 0; i < 8; ++i) std::printf(" %.1f |", by_k[kind][k][i] / nk);
      std::printf("\n");
    }
}

}  // namespace

int main(int argc, char** argv) {
  const int C = argc > 1 ? std::atoi(argv[1]) : 9, n = argc > 2 ? std::atoi(argv[2]) : 100000;
  if (C < 2 || C > 16 || n < 1) {
    std::fprintf(stderr, "usage: cpu_cycles [classes in 2..16] [calls per timing >= 1]\n");
    return 2;
  }
  const FlushDenormals ftz;
  const double fma_rate = lomix_cpu_vector_fma_rate(500 * (int64_t)n);  // vector FMAs per second, this core
  std::printf("C = %d, TP = %d, VW = %d: vector-FMA slots per class vector (%.2f G vector FMAs/s)\n\n", C, TP, VW,
              fma_rate / 1e9);
  per_kind_table(C, n, fma_rate);
  whole_tile_table(C, n, fma_rate);
  return 0;
}
