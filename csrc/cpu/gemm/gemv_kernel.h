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
// How a step of k is multiplied is a second policy, `Step` (GemvWidened below: float32 input
// rows, the weight widened, one FMA per V::width values of k; gemm_avx512.cpp adds one on
// vdpbf16ps, bf16 input rows, two values of k per lane and instruction):
//   Step::X, Step::T          the element types of the input rows and of the weight
//   Step::XReg, Step::WReg    their vector types
//   Step::kStepK              values of k per vector
//   Step::load_x / load_w     n <= kStepK values from p, the rest zero
//   Step::madd(w, x, acc)     acc + the products of w and x, lane by lane (float accumulators)
// acc(i, j) = Σ_p x(i, p) · w(j, p) for the m <= 8 input rows x (m x k, row-major) and the
// weight rows j in [j0, j1) of w (n x k, row-major): every weight row is read once, straight from
// memory, with no packing; each output is one fixed-order sum, so the bits do not depend on how
// the rows are split among threads.
#pragma once

template <class Io, typename Weight>
struct GemvWidened {
  using X = float;
  using T = Weight;
  using XReg = typename Io::V::reg;
  using WReg = typename Io::V::reg;
  static constexpr int kStepK = Io::V::width;
  static XReg load_x(const float* p, int n) { return Io::load_f32(p, n); }
  static WReg load_w(const T* p, int n) {
    if constexpr (std::is_same_v<T, float>) {
      return Io::load_f32(p, n);
    } else {
      return Io::load_bf16(p, n);
    }
  }
  static XReg madd(WReg w, XReg x, XReg acc) { return Io::V::fma(w, x, acc); }
};

// The input rows are read in chunks of k whose M x chunk values stay in L1 (kGemvChunkBytes)
// while the weight rows stream past: without chunks, from M x K floats past L1 (8 x 4096), every
// block of weight rows read the input rows again from L2. Weight rows go in panels of
// kGemvPanelRows; a panel's vector accumulators stay in `state` between chunks, so each output is
// still one sum per lane in the order of p, and one fixed-order reduction: the same bits whatever
// the chunk.
constexpr int64_t kGemvChunkBytes = 16 << 10;
constexpr int64_t kGemvPanelRows = 16;

// The products of input rows [0, M) and weight rows [0, R) over p in [p0, p1): from zero
// (`first`) or from `state`, then into `state` or, after the last chunk, reduced into acc.
template <class Io, class Step, int M, int R>
inline void gemv_block(const typename Step::X* x, int64_t k, int64_t p0, int64_t p1,
                       const typename Step::T* w, float* state, bool first, bool last, float* acc,
                       int64_t ldacc) {
  using V = typename Io::V;
  using reg = typename V::reg;
  constexpr int W = V::width;
  constexpr int S = Step::kStepK;
  reg a[R][M];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      a[r][i] = first ? V::set1(0.0f) : V::load(state + (r * M + i) * W);
    }
  }
  // Whole vectors, then the last values of k (masked loads, the lanes past k zero).
  const auto step = [&](int64_t p, int lanes) {
    typename Step::XReg xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = Step::load_x(x + i * k + p, lanes);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const typename Step::WReg wv = Step::load_w(w + r * k + p, lanes);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) a[r][i] = Step::madd(wv, xv[i], a[r][i]);
    }
  };
  int64_t p = p0;
  for (; p + S <= p1; p += S) step(p, S);
  if (p < p1) step(p, static_cast<int>(p1 - p));
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

template <class Io, class Step, int M>
inline void gemv_rows_m(const typename Step::X* x, int64_t k, const typename Step::T* w,
                        int64_t j0, int64_t j1, float* acc, int64_t ldacc) {
  // 5-8 input rows: half the weight rows per block, so the accumulators (R x M), the input
  // vectors (M) and the weight vector still fit the register file (AVX-512: 16 + 8 + 1 of 32).
  constexpr int R = M <= 4 ? Io::kRows : (Io::kRows > 1 ? Io::kRows / 2 : 1);
  constexpr int W = Io::V::width;
  constexpr int S = Step::kStepK;
  const int64_t chunk = std::max<int64_t>(
      S, kGemvChunkBytes / static_cast<int64_t>(sizeof(typename Step::X) * M) / S * S);
  alignas(64) float state[kGemvPanelRows * M * W];
  for (int64_t panel = j0; panel < j1; panel += kGemvPanelRows) {
    const int64_t panel_end = std::min(j1, panel + kGemvPanelRows);
    for (int64_t p0 = 0; p0 < k; p0 += chunk) {
      const int64_t p1 = std::min(k, p0 + chunk);
      const bool first = p0 == 0, last = p1 == k;
      int64_t j = panel;
      for (; j + R <= panel_end; j += R) {
        gemv_block<Io, Step, M, R>(x, k, p0, p1, w + j * k, state + (j - panel) * M * W, first,
                                   last, acc + j, ldacc);
      }
      for (; j < panel_end; ++j) {
        gemv_block<Io, Step, M, 1>(x, k, p0, p1, w + j * k, state + (j - panel) * M * W, first,
                                   last, acc + j, ldacc);
      }
    }
  }
}

template <class Io, class Step>
void gemv_rows(const void* x_in, int m, int64_t k, const void* w_in, int64_t j0, int64_t j1,
               float* acc, int64_t ldacc) {
  const auto* x = static_cast<const typename Step::X*>(x_in);
  const auto* w = static_cast<const typename Step::T*>(w_in);
  switch (m) {
    case 1: gemv_rows_m<Io, Step, 1>(x, k, w, j0, j1, acc, ldacc); break;
    case 2: gemv_rows_m<Io, Step, 2>(x, k, w, j0, j1, acc, ldacc); break;
    case 3: gemv_rows_m<Io, Step, 3>(x, k, w, j0, j1, acc, ldacc); break;
    case 4: gemv_rows_m<Io, Step, 4>(x, k, w, j0, j1, acc, ldacc); break;
    case 5: gemv_rows_m<Io, Step, 5>(x, k, w, j0, j1, acc, ldacc); break;
    case 6: gemv_rows_m<Io, Step, 6>(x, k, w, j0, j1, acc, ldacc); break;
    case 7: gemv_rows_m<Io, Step, 7>(x, k, w, j0, j1, acc, ldacc); break;
    default: gemv_rows_m<Io, Step, 8>(x, k, w, j0, j1, acc, ldacc); break;
  }
}

void gemv_f32(const void* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
              float* acc, int64_t ldacc) {
  gemv_rows<GemvIo, GemvWidened<GemvIo, float>>(x, m, k, w, j0, j1, acc, ldacc);
}
void gemv_bf16(const void* x, int m, int64_t k, const void* w, int64_t j0, int64_t j1,
               float* acc, int64_t ldacc) {
  gemv_rows<GemvIo, GemvWidened<GemvIo, uint16_t>>(x, m, k, w, j0, j1, acc, ldacc);
}
