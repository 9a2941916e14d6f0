// The decoding-sized product of gemm::gemv (gemm.h), written once for every ISA: each
// translation unit that includes it (gemm_avx512.cpp, gemm_avx2.cpp) does so inside its own ISA
// namespace, after defining `GemvIo`, and gets gemv_f32 / gemv_bf16 (gemm_kernels.h's GemvFn) on
// it. GemvIo has:
//   Io::V                     the float vector type (VecF512, VecF256)
//   Io::kRows                 weight rows per block of up to 4 input rows (accumulators: kRows x
//                             the input rows); blocks of 5-8 input rows take half as many
//   Io::load_f32(p, n)        n <= V::width floats, the lanes past n zero
//   Io::load_bf16(p, n)       n <= V::width bf16 values widened to float (exactly), the rest zero
//   Io::reduce_add(v)         the sum of v's lanes, in a fixed order
// acc(i, j) = Σ_p x(i, p) · w(j, p) for the m <= 8 input rows x (float32, m x k, row-major) and
// the weight rows j in [j0, j1) of w (n x k, row-major, float or bf16 bits): every weight row is
// read once, straight from memory, with no packing; each output is one fixed-order sum, so the
// bits do not depend on how the rows are split among threads.
#pragma once

template <class Io>
inline typename Io::V::reg gemv_load(const float* p, int n) { return Io::load_f32(p, n); }
template <class Io>
inline typename Io::V::reg gemv_load(const uint16_t* p, int n) { return Io::load_bf16(p, n); }

// The input rows are read in chunks of k whose M x chunk floats stay in L1 (kGemvChunkBytes)
// while the weight rows stream past: without chunks, from M x K floats past L1 (8 x 4096), every
// block of weight rows read the input rows again from L2. Weight rows go in panels of
// kGemvPanelRows; a panel's vector accumulators stay in `state` between chunks, so each output is
// still one sum per lane in the order of p, and one fixed-order reduction: the same bits whatever
// the chunk.
constexpr int64_t kGemvChunkBytes = 16 << 10;
constexpr int64_t kGemvPanelRows = 16;

// The products of input rows [0, M) and weight rows [0, R) over p in [p0, p1): from zero
// (`first`) or from `state`, then into `state` or, after the last chunk, reduced into acc.
template <class Io, int M, int R, typename T>
inline void gemv_block(const float* x, int64_t k, int64_t p0, int64_t p1, const T* w,
                       float* state, bool first, bool last, float* acc, int64_t ldacc) {
  using V = typename Io::V;
  using reg = typename V::reg;
  constexpr int W = V::width;
  reg a[R][M];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      a[r][i] = first ? V::set1(0.0f) : V::load(state + (r * M + i) * W);
    }
  }
  for (int64_t p = p0; p < p1; p += W) {
    const int lanes = static_cast<int>(std::min<int64_t>(W, k - p));
    reg xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = Io::load_f32(x + i * k + p, lanes);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const reg wv = gemv_load<Io>(w + r * k + p, lanes);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) a[r][i] = V::fma(wv, xv[i], a[r][i]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      if (last) {
        acc[i * ldacc + r] = Io::reduce_add(a[r][i]);
      } else {
        V::store(state + (r * M + i) * W, a[r][i]);
      }
    }
  }
}

template <class Io, int M, typename T>
inline void gemv_rows_m(const float* x, int64_t k, const T* w, int64_t j0, int64_t j1,
                        float* acc, int64_t ldacc) {
  // 5-8 input rows: half the weight rows per block, so the accumulators (R x M), the input
  // vectors (M) and the weight vector still fit the register file (AVX-512: 16 + 8 + 1 of 32).
  constexpr int R = M <= 4 ? Io::kRows : (Io::kRows > 1 ? Io::kRows / 2 : 1);
  constexpr int W = Io::V::width;
  const int64_t chunk = std::max<int64_t>(W, kGemvChunkBytes / (4 * M) / W * W);
  alignas(64) float state[kGemvPanelRows * M * W];
  for (int64_t panel = j0; panel < j1; panel += kGemvPanelRows) {
    const int64_t panel_end = std::min(j1, panel + kGemvPanelRows);
    for (int64_t p0 = 0; p0 < k; p0 += chunk) {
      const int64_t p1 = std::min(k, p0 + chunk);
      const bool first = p0 == 0, last = p1 == k;
      int64_t j = panel;
      for (; j + R <= panel_end; j += R) {
        gemv_block<Io, M, R>(x, k, p0, p1, w + j * k, state + (j - panel) * M * W, first, last,
                             acc + j, ldacc);
      }
      for (; j < panel_end; ++j) {
        gemv_block<Io, M, 1>(x, k, p0, p1, w + j * k, state + (j - panel) * M * W, first, last,
                             acc + j, ldacc);
      }
    }
  }
}

template <class Io, typename T>
void gemv_rows(const float* x, int m, int64_t k, const T* w, int64_t j0, int64_t j1, float* acc,
               int64_t ldacc) {
  switch (m) {
    case 1: gemv_rows_m<Io, 1>(x, k, w, j0, j1, acc, ldacc); break;
    case 2: gemv_rows_m<Io, 2>(x, k, w, j0, j1, acc, ldacc); break;
    case 3: gemv_rows_m<Io, 3>(x, k, w, j0, j1, acc, ldacc); break;
    case 4: gemv_rows_m<Io, 4>(x, k, w, j0, j1, acc, ldacc); break;
    case 5: gemv_rows_m<Io, 5>(x, k, w, j0, j1, acc, ldacc); break;
    case 6: gemv_rows_m<Io, 6>(x, k, w, j0, j1, acc, ldacc); break;
    case 7: gemv_rows_m<Io, 7>(x, k, w, j0, j1, acc, ldacc); break;
    default: gemv_rows_m<Io, 8>(x, k, w, j0, j1, acc, ldacc); break;
  }
}

void gemv_f32(const float* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
              float* acc, int64_t ldacc) {
  gemv_rows<GemvIo>(x, m, k, static_cast<const float*>(w), j0, j1, acc, ldacc);
}
void gemv_bf16(const float* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
               float* acc, int64_t ldacc) {
  gemv_rows<GemvIo>(x, m, k, static_cast<const uint16_t*>(w), j0, j1, acc, ldacc);
}
