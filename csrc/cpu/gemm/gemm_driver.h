// The BLIS-style blocked loop nest, packing and fused write-back, written once over a micro-kernel
// `Kernel` (see gemm_avx512.cpp / gemm_avx2.cpp for the traits it must provide). Included only
// inside an ISA namespace of an ISA translation unit, so each ISA gets its own copy compiled with
// its own -m flags.
//
// Loop nest for one thread's block of C (rows [m0, m1), columns [n0, n1)):
//   jc over n in steps of nc          B block (kc x nc) lives in L2/L3
//     pc over k in steps of kc        pack B(pc, jc) once
//       ic over m in steps of mc      pack A(ic, pc): the activation derivative is applied here
//         jr over nc in steps of nr   B micro-panel (kc x nr) stays in L1 across the ir loop
//           ir over mc in steps of mr micro-kernel: mr x nr tile in registers, then write-back
// The write-back adds the partial sum of earlier k blocks (kept in C for fp32, in an fp32 buffer
// otherwise) and, after the last k block, the bias, the pre-activation store and the activation.
#pragma once

template <class Kernel>
struct Driver {
  using In = typename Kernel::In;
  using V = typename Kernel::V;
  using R = typename V::reg;
  static constexpr int MR = Kernel::MR;
  static constexpr int NR = Kernel::NR;
  static constexpr int KU = Kernel::KU;  // k elements per packed unit (1 fp32, 2 bf16)
  static constexpr int W = V::width;
  static constexpr bool kFloat = std::is_same_v<In, float>;
  static constexpr int kMaxPanels = 64;  // mc / mr bound of pack_a_block_transposed's row sums
  static_assert(NR % W == 0, "nr must be a multiple of the vector width");
  static_assert(MR <= W, "column-major A packing loads one register per k");

  static int64_t units(int64_t k) { return (k + KU - 1) / KU; }

  // ---- packing ------------------------------------------------------------------------------

  // A rows [i0, i0 + mr) x k [p0, p0 + kc) -> one mr-tall micro-panel: unit (u, r) at u * MR + r.
  template <chainrule::Activation G>
  static void pack_a_panel(const Problem& p, int64_t i0, int mr, int64_t p0, int64_t kc,
                           uint32_t* dst, float* row_sums, In* transformed) {
    const In* a = static_cast<const In*>(p.a);
    const In* pre = static_cast<const In*>(p.a_pre);
    const int64_t kcu = units(kc);
    if (p.a_col_stride == 1) {
      // Rows contiguous in k: transform W values of one row at a time, scatter into the panel.
      // (Transposed views go through pack_a_block_transposed.)
      alignas(64) float tmp[W];
      if (mr < MR || (kc % KU) != 0) std::memset(dst, 0, sizeof(uint32_t) * kcu * MR);
      for (int r = 0; r < mr; ++r) {
        const int64_t off = (i0 + r) * p.a_row_stride + p0;
        R sum = V::set1(0.0f);
        for (int64_t k = 0; k < kc; k += W) {
          const int n = static_cast<int>(std::min<int64_t>(W, kc - k));
          R v = Kernel::load(a + off + k, n);
          if constexpr (G != chainrule::Activation::none) {
            v = simd_activation_grad<G, V>(v, Kernel::load(pre + off + k, n));
            v = Kernel::round_to_input(v);
            if (transformed) Kernel::store(transformed + off + k, v, n);
          }
          if (row_sums) sum = V::add(sum, v);
          V::store(tmp, v);
          if constexpr (kFloat) {
            float* d = reinterpret_cast<float*>(dst);
            for (int t = 0; t < n; ++t) d[(k + t) * MR + r] = tmp[t];
          } else {
            uint16_t* d = reinterpret_cast<uint16_t*>(dst);
            for (int t = 0; t < n; ++t) {
              const int64_t kk = k + t;
              d[((kk >> 1) * MR + r) * 2 + (kk & 1)] = Kernel::bf16_bits(tmp[t]);
            }
          }
        }
        if (row_sums) row_sums[i0 + r] += Kernel::reduce_add(sum);
      }
    }
  }

  // A rows [i0, i0 + mc) x k [p0, p0 + kc) when A is a transposed view (columns contiguous in
  // m, e.g. dZᵀ in the weight gradient): one contiguous run of mc values per k feeds all mc / MR
  // panels, so every source row is read once, in order, instead of MR values per row per panel.
  template <chainrule::Activation G>
  static void pack_a_block_transposed(const Problem& p, int64_t i0, int64_t mc, int64_t p0,
                                      int64_t kc, uint32_t* dst, float* row_sums) {
    const In* a = static_cast<const In*>(p.a);
    const In* pre = static_cast<const In*>(p.a_pre);
    const int64_t kcu = units(kc);
    const int panels = static_cast<int>((mc + MR - 1) / MR);  // <= kMaxPanels (see the TUs)
    alignas(64) float sums[kMaxPanels][W];
    if (row_sums) std::memset(sums, 0, sizeof(float) * panels * W);
    // Consecutive k are a whole row of the source apart (usually another page), which the
    // hardware prefetcher does not follow: fetch the runs kPrefetchRows ahead ourselves.
    constexpr int64_t kPrefetchRows = 8;
    const int64_t run_bytes = mc * static_cast<int64_t>(sizeof(In));
    for (int64_t u = 0; u < kcu; ++u) {
      for (int h = 0; h < KU; ++h) {
        const int64_t k = u * KU + h + kPrefetchRows;
        if (k >= kc) break;
        const char* src = reinterpret_cast<const char*>(a + (p0 + k) * p.a_col_stride + i0);
        const char* src_pre = pre ? reinterpret_cast<const char*>(pre + (p0 + k) * p.a_col_stride + i0) : nullptr;
        for (int64_t byte = 0; byte < run_bytes + 63; byte += 64) {
          _mm_prefetch(src + std::min(byte, run_bytes - 1), _MM_HINT_T0);
          if (src_pre) _mm_prefetch(src_pre + std::min(byte, run_bytes - 1), _MM_HINT_T0);
        }
      }
      for (int q = 0; q < panels; ++q) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, mc - q * MR));
        R v[KU];
        for (int h = 0; h < KU; ++h) {
          const int64_t k = u * KU + h;
          if (k >= kc) { v[h] = V::set1(0.0f); continue; }
          const int64_t off = (p0 + k) * p.a_col_stride + i0 + q * MR;
          v[h] = Kernel::load(a + off, mr);
          if constexpr (G != chainrule::Activation::none) {
            v[h] = simd_activation_grad<G, V>(v[h], Kernel::load(pre + off, mr));
            v[h] = Kernel::round_to_input(v[h]);
          }
          if (row_sums) V::store(sums[q], V::add(V::load(sums[q]), v[h]));
        }
        uint32_t* panel = dst + q * kcu * MR + u * MR;
        if constexpr (kFloat) {
          Kernel::store_f32(reinterpret_cast<float*>(panel), v[0], MR);
        } else {
          Kernel::store_pairs(panel, v[0], v[1], MR);
        }
      }
    }
    if (row_sums) {
      for (int q = 0; q < panels; ++q) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, mc - q * MR));
        for (int r = 0; r < mr; ++r) row_sums[i0 + q * MR + r] += sums[q][r];
      }
    }
  }

  // B k [p0, p0 + kc) x columns [j0, j0 + nr) -> one nr-wide micro-panel: unit (u, c) at u * NR + c.
  static void pack_b_panel(const Problem& p, int64_t p0, int64_t kc, int64_t j0, int nr,
                           uint32_t* dst) {
    const In* b = static_cast<const In*>(p.b);
    const int64_t kcu = units(kc);
    if (p.b_col_stride == 1) {
      // Rows of B contiguous in n: copy nr values per k (pairs of k rows interleaved for bf16).
      for (int64_t u = 0; u < kcu; ++u) {
        for (int c = 0; c < NR; c += W) {
          const int n = std::max(0, std::min(W, nr - c));
          if constexpr (kFloat) {
            R v = n > 0 ? Kernel::load(b + (p0 + u) * p.b_row_stride + j0 + c, n) : V::set1(0.0f);
            V::store(reinterpret_cast<float*>(dst) + u * NR + c, v);
          } else {
            const int64_t k = p0 + u * 2;
            const bool has_odd = u * 2 + 1 < kc;
            Kernel::store_pair_rows(dst + u * NR + c, b + k * p.b_row_stride + j0 + c,
                                    has_odd ? b + (k + 1) * p.b_row_stride + j0 + c : nullptr, n);
          }
        }
      }
    } else if constexpr (requires { &Kernel::pack_b_transposed; }) {
      Kernel::pack_b_transposed(b, p.b_col_stride, p0, kc, j0, nr, dst);
    } else {
      // B is a transposed view (the weight in the forward): columns contiguous in k.
      if (nr < NR || (kc % KU) != 0) std::memset(dst, 0, sizeof(uint32_t) * kcu * NR);
      for (int c = 0; c < nr; ++c) {
        const In* src = b + (j0 + c) * p.b_col_stride + p0;
        if constexpr (kFloat) {
          float* d = reinterpret_cast<float*>(dst) + c;
          for (int64_t k = 0; k < kc; ++k) d[k * NR] = src[k];
        } else {
          uint16_t* d = reinterpret_cast<uint16_t*>(dst) + c * 2;
          for (int64_t k = 0; k < kc; ++k) d[(k >> 1) * NR * 2 + (k & 1)] = src[k];
        }
      }
    }
  }

  // ---- write-back ---------------------------------------------------------------------------

  // tile: MR x NR fp32 sums over this k block. `partial` (ld partial_ld) holds the sums of the
  // earlier k blocks for non-fp32 outputs; fp32 outputs keep them in C itself.
  template <chainrule::Activation A>
  static void write_back(const Problem& p, const float* tile, int64_t i0, int64_t j0, int mr,
                         int nr, bool first, bool last, float* partial, int64_t partial_ld) {
    In* c = static_cast<In*>(p.c);
    const In* bias = static_cast<const In*>(p.bias);
    In* pre = static_cast<In*>(p.pre_activation);
    for (int r = 0; r < mr; ++r) {
      In* c_row = c + (i0 + r) * p.ldc + j0;
      float* part_row = kFloat ? reinterpret_cast<float*>(c_row) : partial + r * partial_ld;
      for (int h = 0; h < NR; h += W) {
        const int n = std::min(W, nr - h);
        if (n <= 0) break;
        R v = V::load(tile + r * NR + h);
        if (!first) {
          v = V::add(v, Kernel::load_f32(part_row + h, n));
        } else if (p.accumulate) {
          v = V::add(v, Kernel::load(c_row + h, n));
        }
        if (!last) {
          Kernel::store_f32(part_row + h, v, n);
          continue;
        }
        if (bias) v = V::add(v, Kernel::load(bias + j0 + h, n));
        // Z is rounded to the storage type before the activation, as F.linear + act would do:
        // the output is then the same whether or not Z is kept (a no-op for fp32).
        v = Kernel::round_to_input(v);
        if (pre) Kernel::store(pre + (i0 + r) * p.ldc + j0 + h, v, n);
        Kernel::store(c_row + h, simd_activation_forward<A, V>(v), n);
      }
    }
  }

  // ---- loop nest ----------------------------------------------------------------------------

  template <chainrule::Activation A, chainrule::Activation G>
  static void run(const Problem& p, const Blocking& bl, int64_t m0, int64_t m1, int64_t n0,
                  int64_t n1, bool owns_row_sums, const Workspace& ws) {
    alignas(64) float tile[MR * NR];
    for (int64_t jc = n0; jc < n1; jc += bl.nc) {
      const int64_t nc = std::min(bl.nc, n1 - jc);
      // Work done once per row of A: by the thread owning column 0, in its first column block.
      float* row_sums = (owns_row_sums && jc == n0) ? p.a_row_sums : nullptr;
      In* transformed = (owns_row_sums && jc == n0) ? static_cast<In*>(p.a_transformed) : nullptr;
      for (int64_t pc = 0; pc < p.k; pc += bl.kc) {
        const int64_t kc = std::min(bl.kc, p.k - pc);
        const int64_t kcu = units(kc);
        const bool first = pc == 0;
        const bool last = pc + kc == p.k;
        for (int64_t jr = 0; jr < nc; jr += NR) {
          pack_b_panel(p, pc, kc, jc + jr, static_cast<int>(std::min<int64_t>(NR, nc - jr)),
                       ws.b_pack + (jr / NR) * kcu * NR);
        }
        for (int64_t ic = m0; ic < m1; ic += bl.mc) {
          const int64_t mc = std::min(bl.mc, m1 - ic);
          if (p.a_col_stride == 1) {
            for (int64_t ir = 0; ir < mc; ir += MR) {
              pack_a_panel<G>(p, ic + ir, static_cast<int>(std::min<int64_t>(MR, mc - ir)), pc,
                              kc, ws.a_pack + (ir / MR) * kcu * MR, row_sums, transformed);
            }
          } else {
            pack_a_block_transposed<G>(p, ic, mc, pc, kc, ws.a_pack, row_sums);
          }
          for (int64_t jr = 0; jr < nc; jr += NR) {
            const uint32_t* b_panel = ws.b_pack + (jr / NR) * kcu * NR;
            const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
              // The write-back reads and writes this tile of C (or of the partial sums), usually
              // out of L2/L3: ask for it now so it arrives while the micro-kernel runs.
              for (int r = 0; r < mr; ++r) {
                const char* row = static_cast<const char*>(p.c) +
                                  ((ic + ir + r) * p.ldc + jc + jr) * sizeof(In);
                _mm_prefetch(row, _MM_HINT_T0);
                _mm_prefetch(row + NR * sizeof(In) - 1, _MM_HINT_T0);
              }
              Kernel::compute(kcu, ws.a_pack + (ir / MR) * kcu * MR, b_panel, tile);
              float* partial = ws.partial
                  ? ws.partial + (ic + ir - m0) * ws.partial_ld + jr
                  : nullptr;
              write_back<A>(p, tile, ic + ir, jc + jr, mr, nr, first, last, partial,
                            ws.partial_ld);
            }
          }
        }
      }
    }
  }
};

// Turns the problem's runtime activations into template constants (forward epilogue or
// packing derivative; never both at once).
template <class Kernel>
void run_block(const Problem& p, const Blocking& bl, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1, bool owns_row_sums, const Workspace& ws) {
  using chainrule::Activation;
  if (p.activation_grad != Activation::none) {
    chainrule::dispatch_activation(p.activation_grad, [&](auto g) {
      Driver<Kernel>::template run<Activation::none, decltype(g)::value>(p, bl, m0, m1, n0, n1,
                                                                         owns_row_sums, ws);
    });
  } else {
    chainrule::dispatch_activation(p.activation, [&](auto a) {
      Driver<Kernel>::template run<decltype(a)::value, Activation::none>(p, bl, m0, m1, n0, n1,
                                                                         owns_row_sums, ws);
    });
  }
}
