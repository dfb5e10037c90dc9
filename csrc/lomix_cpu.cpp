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
//
// The data path, one file each: common.h (problem, dtypes, errors), simd.h (vector math),
// layout.h (packed layout, work items, tile buffers), interpolate.h (loading a tile), maps.h (building
// a map), stats.h (activation + statistics), adjoint.h (the backward's adjoints); this file: the C ABI
// (the forward and backward passes over the work items).
#include "interpolate.h"
#include "maps.h"
#include "stats.h"
#include "adjoint.h"
#include "grad_pool.h"

extern "C" {

int lomix_cpu_abi_version() { return 1; }

// This thread's sustained rate of vector multiply-adds (vectors of this build's width, VW lanes) per
// second: 12 independent chains, so latency is hidden and only the FMA pipes count. benchmarks/floor.py
// divides its operation count by it (a measured peak, not a guessed pipe count and clock).
double lomix_cpu_vector_fma_rate(int64_t iters) {
  vf acc[12];
  const vf m = vf{} + 1.0000001f, add = vf{} + 1e-7f;
  for (int i = 0; i < 12; ++i) acc[i] = vf{} + (float)i;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = acc[i] * m + add;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0.0f;
  for (int i = 0; i < 12; ++i) sink += acc[i][0];
  return sink == 12345.0f ? 0.0 : 12.0 * (double)iters / seconds;  // (sink keeps the chains alive)
}

// Gradient buffers from the pool (grad_pool.h): a DLPack tensor for torch.from_dlpack (null: out of
// memory or bad arguments); reserve sets the cache's cap to one backward's bytes; release frees the cache.
DLManagedTensor* lomix_cpu_pool_tensor(int ndim, const int64_t* shape, int dl_code, int bits) {
  return pooled_tensor(ndim, shape, dl_code, bits);
}
void lomix_cpu_pool_reserve(int64_t bytes) { grad_pool().reserve((size_t)bytes); }
void lomix_cpu_pool_release() { grad_pool().release(); }
int64_t lomix_cpu_pool_cached_bytes() { return (int64_t)grad_pool().cached_bytes(); }

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
    const FlushDenormals ftz;
    Tile tl(ly.L, C, ly.max_k);
    aligned_vector<float> lane_buf(map_block * VW);  // VW-lane float partials of the per-map sums (zero:
                                                     // made so, and left so by every flush, fold_lanes)
    vf* lanes = (vf*)lane_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nI; ++it) {
      const Item item = items[it];
      double* acc = &part[(size_t)it * item_block];
      auto flush = [&]() {
        fold_lanes(acc, lanes, map_block);
      };
      int64_t tiles = 0;
      for (int64_t p0 = item.p0; p0 < item.p1; p0 += TP) {
        const int n = (int)std::min<int64_t>(TP, item.p1 - p0);
        if (++tiles % FLUSH_TILES == 0) flush();
        load_tile(pr, stages, item.b, p0, n, tl, true, errs[it]);
        if (errs[it].code != ERR_NONE) break;
        target_stats(pr, tl, acc + map_block);
        forward_maps(pr, ly, tl, lanes);
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
  const int64_t B = pr.batch;
  const std::vector<Stage> stages = make_stages(pr);
  const std::vector<Item> items = make_items(pr);
  const int64_t nI = (int64_t)items.size();
  const int64_t nP = ly.num_params();
  std::vector<double> part((size_t)nI * nP, 0.0);
  std::vector<ItemError> errs(nI);
  std::vector<float> qgz(gzsum, gzsum + (size_t)M * B * C);  // q·∂L/∂zsum, as map_grad takes it
  for (float& v : qgz) v *= (float)pr.q;
  for (int i = 0; i < L; ++i)
    advise_huge_pages(grad_logits[i], (size_t)(B * C * stages[i].pixels) * logit_bytes(pr));
  // Resampled stages: each item scatters the interpolation adjoint into a private double buffer
  // over the native rows its band touches; buffers are summed in item order afterwards.
  const int oa = outer_axis(pr);
  auto row_stride = [&](const Stage& S) { return oa == OUTER_3D ? S.size[1] * S.size[2] : S.size[2]; };
  std::vector<std::vector<double>> scatter((size_t)nI * L);
  std::vector<int64_t> first_row((size_t)nI * L, 0);

#pragma omp parallel num_threads(num_threads(pr))
  {
    const FlushDenormals ftz;
    Tile tl(L, C, ly.max_k);
    aligned_vector<float> lane_buf((size_t)nP * VW);  // per-parameter VW-lane partials of the current flush
                                                      // window (zero: made so, left so by fold_lanes)
    vf* dp = (vf*)lane_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nI; ++it) {
      const Item item = items[it];
      double* out = nP ? &part[(size_t)it * nP] : nullptr;
      auto flush = [&]() { fold_lanes(out, dp, (size_t)nP); };
      int64_t tiles = 0;
      for (int64_t p0 = item.p0; p0 < item.p1; p0 += TP) {
        const int n = (int)std::min<int64_t>(TP, item.p1 - p0);
        if (++tiles % FLUSH_TILES == 0) flush();
        load_tile(pr, stages, item.b, p0, n, tl, false, errs[it]);
        backward_maps(pr, ly, tl, gce, ginter, qgz.data(), B, item.b, dp);
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
          scatter_stage(pr, S, i, p0, n, tl, buf.data(), (int64_t)buf.size() / C,
                        first_row[(size_t)it * L + i] * stride);
        }
        store_gradient_rows(pr, stages, item.b, p0, n, tl, grad_logits);
      }
      flush();
    }
    stream_fence();  // (the streamed gradient rows are visible to every thread once the region ends)
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
