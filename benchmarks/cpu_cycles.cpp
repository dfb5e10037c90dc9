// Cost of each per-tile function of the fused CPU kernels with the tile in L1, per map kind, in
// vector-FMA slots per class vector (one class's VW pixels): the time of 100 000 calls times this
// core's measured vector-FMA rate (csrc's lomix_cpu_vector_fma_rate), divided by the tile's C·TP/VW
// class vectors — the unit benchmarks/floor.py counts operations in, so each number reads against the
// floor's operations per class vector (README, Performance). One map per kind, k = 2 members.
//
//     make cycles                      # builds this file against csrc/ (AVX-512) and runs it
//     ./build/cpu_cycles 14            # another class count (default 9)
//     ./build/cpu_cycles 9 1000        # calls per timing (default 100 000)
//
// It includes csrc/lomix_cpu.cpp (one translation unit, as the library is built), so it times the
// kernels' own functions, inlined as they are there.
#include "../csrc/lomix_cpu.cpp"

#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  const int C = argc > 1 ? std::atoi(argv[1]) : 9, L = 4, N = argc > 2 ? std::atoi(argv[2]) : 100000;
  if (C < 2 || C > 16 || N < 1) {
    std::fprintf(stderr, "usage: cpu_cycles [classes in 2..16] [calls per timing >= 1]\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> logits(L, std::vector<float>((size_t)C * TP));
  for (auto& v : logits)
    for (auto& x : v) x = 2.0f * normal(rng);
  std::vector<int64_t> target(TP);
  for (auto& y : target) y = (int64_t)(rng() % C);
  const void* lp[4] = {logits[0].data(), logits[1].data(), logits[2].data(), logits[3].data()};
  int64_t sizes[12] = {1, 8, 8, 1, 8, 8, 1, 8, 8, 1, 8, 8};  // one 8x8 tile of TP = 64 pixels per stage
  int32_t op[8] = {OP_ORIG, OP_ORIG, OP_ORIG, OP_ORIG, OP_ADD, OP_MULT, OP_CAT, OP_AWF};
  int32_t arg[8] = {0, 1, 2, 3, 0, 0, 0, 0};
  int32_t subset_size[1] = {2}, members[2] = {0, 1};
  std::vector<float> cat_w((size_t)C * 2 * C), cat_b(C, 0.1f), awf_v(2 * 2 * C), awf_c(2, 0.0f);
  for (auto& x : cat_w) x = 0.2f * normal(rng);
  for (auto& x : awf_v) x = 0.2f * normal(rng);

  Problem pr{};
  pr.batch = 1; pr.classes = C; pr.pixels = TP; pr.num_stages = L; pr.num_maps = 8; pr.num_subsets = 1;
  pr.logit_dtype = DT_F32; pr.target_kind = TK_I64; pr.q = 2; pr.num_labels = C; pr.num_threads = 1;
  pr.awf_block_diagonal = 1; pr.spatial_rank = 2; pr.out_size[0] = 1; pr.out_size[1] = 8; pr.out_size[2] = 8;
  pr.stage_size = sizes; pr.logits = lp; pr.target = target.data();
  pr.map_op = op; pr.map_arg = arg; pr.subset_size = subset_size; pr.subset_members = members;
  pr.cat_w = cat_w.data(); pr.cat_b = cat_b.data(); pr.awf_v = awf_v.data(); pr.awf_c = awf_c.data();

  const Layout ly(pr);
  const std::vector<Stage> stages = make_stages(pr);
  Tile tl(L, C, ly.max_k);
  ItemError err;
  const FlushDenormals ftz;
  load_tile(pr, stages, 0, 0, TP, tl, true, err);
  double target_sums[64] = {0};
  target_stats(pr, tl, target_sums);
  aligned_vector<float> lane_buf((size_t)3 * 8 * C * VW), param_buf((size_t)ly.num_params() * VW);
  vf* lanes = (vf*)lane_buf.data();
  vf* dparams = (vf*)param_buf.data();
  std::vector<float> gce(C, 0.1f), gi(C, -0.2f), gz(C, 0.05f);

  const double fma_rate = lomix_cpu_vector_fma_rate(500 * (int64_t)N);  // vector FMAs per second, this core
  const double class_vectors = (double)C * TP / VW;
  auto slots = [&](auto&& f) {  // best of 3 runs of N calls, in FMA slots per class vector
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < N; ++it) {
        f();
        asm volatile("" ::: "memory");
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best * fma_rate / N / class_vectors;
  };

  std::printf("C = %d, TP = %d, VW = %d: vector-FMA slots per class vector (%.2f G vector FMAs/s)\n", C, TP, VW,
              fma_rate / 1e9);
  std::printf("| map | build | activate (forward) | statistics | activate (backward) | dL/dz | adjoint | forward | backward |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  const char* names[5] = {"orig", "add", "mult", "cat", "awf"};
  const int maps[5] = {0, 4, 5, 6, 7};
  for (int m = 0; m < 5; ++m) {
    const int u = maps[m];
    const float* z = build_map(pr, ly, u, tl);
    // stage exponentials are made once per tile for all original and add maps: not charged to one map
    for (int j = 0; j < L; ++j) stage_exp(pr, tl, j);
    const double build = op[u] == OP_ORIG ? 0.0 : slots([&] { z = build_map(pr, ly, u, tl); });
    const double act_f = slots([&] { activate_map(pr, ly, u, z, tl, true); });
    const double stats = slots([&] { accumulate_stats(pr, z, tl, lanes + (size_t)u * 3 * C); });
    const double act_b = slots([&] { activate_map(pr, ly, u, z, tl, false); });
    const double grad = slots([&] { map_grad(pr, tl, gce.data(), gi.data(), gz.data()); });
    const double adj = slots([&] { op_backward(pr, ly, u, tl, dparams); });
    const bool rebuild = !(by_product(pr, ly, u) && op[u] == OP_ADD);  // the backward's recompute
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", names[m], build, act_f, stats,
                act_b, grad, adj, build + act_f + stats, (rebuild ? build : 0.0) + act_b + grad + adj);
  }
  double exps = slots([&] { tl.ex_ready.assign(L, 0); stage_exp(pr, tl, 0); });
  std::printf("(one stage's exponentials, made once per tile and pass: %.1f)\n", exps);
  return 0;
}
