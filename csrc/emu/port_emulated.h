// chainrule::port under the emulator: cp.async, ldmatrix and mma.sync with the semantics and the
// register fragment layouts of the PTX ISA (sections "Data Movement and Conversion Instructions:
// cp.async", "ldmatrix" and "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8").
//
// cp.async: the destination is poisoned (0xff bytes, NaN in every float format) when the copy is
// issued and the data lands only at the cp.async.wait_group that retires its group, so a wait that
// is too shallow reads NaN instead of silently reading the right data a little early.
#pragma once

#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "emu/builtins.h"

namespace chainrule::emu::detail {

inline void complete_ldmatrix(Fiber* const* lanes, uint32_t) {
  const int count = lanes[0]->op.variant & 7;
  const bool trans = (lanes[0]->op.variant >> 3) != 0;
  for (int matrix = 0; matrix < count; ++matrix) {
    // Lane 8*matrix + r gives the address of row r of the matrix.
    auto row = [&](int r) { return static_cast<const unsigned char*>(lanes[8 * matrix + r]->op.address); };
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t word;
      if (!trans) {  // lane holds row lane/4, columns 2*(lane%4) and 2*(lane%4)+1
        std::memcpy(&word, row(lane / 4) + 4 * (lane % 4), 4);
      } else {  // the transpose: rows 2*(lane%4) and 2*(lane%4)+1 of column lane/4
        uint16_t low, high;
        std::memcpy(&low, row(2 * (lane % 4)) + 2 * (lane / 4), 2);
        std::memcpy(&high, row(2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
        word = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
      }
      lanes[lane]->op.out[matrix] = word;
    }
  }
}

template <int Count, bool Trans>
void ldmatrix(uint32_t* result, const void* row_address, const std::source_location& site) {
#if CHAINRULE_EMU_TSAN
  // the lane that names a row reads it (the completion below runs unchecked)
  if ((t_fiber->linear & 31) < 8 * Count) __tsan_read_range(const_cast<void*>(row_address), 16);
#endif
  InternalAccess internal;
  WarpOp& op = begin_warp_op(WarpKind::ldmatrix, 0xffffffffu, &complete_ldmatrix, site);
  op.variant = static_cast<uint8_t>(Count | (Trans ? 8 : 0));
  op.address = row_address;
  if ((t_fiber->linear & 31) < 8 * Count) check_aligned(row_address, 16, "an ldmatrix row (16-byte rows)");
  warp_collective(true);
  for (int i = 0; i < Count; ++i) result[i] = t_fiber->op.out[i];
}

// mma variants: bit 0 = k16 (else k8), bit 1 = bf16 (else f16)
inline double b16_to_double(uint32_t bits, bool bf16) {
  if (bf16) {
    const uint32_t f32 = bits << 16;
    float value;
    std::memcpy(&value, &f32, 4);
    return value;
  }
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return static_cast<double>(__half2float(__half(raw)));
}

inline void complete_mma(Fiber* const* lanes, uint32_t) {
  const bool k16 = (lanes[0]->op.variant & 1) != 0;
  const bool bf16 = (lanes[0]->op.variant & 2) != 0;
  const int k_dim = k16 ? 16 : 8;
  double a[16][16], b[16][8], c[16][8];
  auto half_of = [](uint32_t word, int which) { return which ? word >> 16 : word & 0xffffu; };
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* in = lanes[lane]->op.in;
    const int g = lane >> 2, t = lane & 3;
    if (k16) {
      for (int i = 0; i < 8; ++i)
        a[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = b16_to_double(half_of(in[i / 2], i % 2), bf16);
      for (int i = 0; i < 4; ++i)
        b[2 * t + (i % 2) + 8 * (i / 2)][g] = b16_to_double(half_of(in[4 + i / 2], i % 2), bf16);
    } else {
      for (int i = 0; i < 4; ++i)
        a[g + 8 * (i / 2)][2 * t + (i % 2)] = b16_to_double(half_of(in[i / 2], i % 2), bf16);
      for (int i = 0; i < 2; ++i) b[2 * t + i][g] = b16_to_double(half_of(in[4], i), bf16);
    }
    for (int i = 0; i < 4; ++i) {
      float value;
      std::memcpy(&value, &in[6 + i], 4);
      c[g + 8 * (i / 2)][2 * t + (i % 2)] = value;
    }
  }
  // The products of 16-bit inputs are exact in fp64; the sum is rounded to fp32 once. (Tensor cores
  // round differently in the last bits; tests compare against fp64 with a tolerance.)
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
      double sum = c[row][col];
      for (int k = 0; k < k_dim; ++k) sum += a[row][k] * b[k][col];
      const float rounded = static_cast<float>(sum);
      std::memcpy(&lanes[lane]->op.out[i], &rounded, 4);
    }
  }
}

template <typename T, bool K16>
void mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, const std::source_location& site) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k{8,16}: T must be __nv_bfloat16 or __half");
  InternalAccess internal;
  WarpOp& op = begin_warp_op(WarpKind::mma, 0xffffffffu, &complete_mma, site);
  op.variant = static_cast<uint8_t>((K16 ? 1 : 0) | (std::is_same_v<T, __nv_bfloat16> ? 2 : 0));
  constexpr int a_regs = K16 ? 4 : 2, b_regs = K16 ? 2 : 1;
  for (int i = 0; i < 4; ++i) op.in[i] = i < a_regs ? a[i] : 0;
  for (int i = 0; i < 2; ++i) op.in[4 + i] = i < b_regs ? b[i] : 0;
  std::memcpy(&op.in[6], c, 16);
  warp_collective(true);
  std::memcpy(d, t_fiber->op.out, 16);
}

}  // namespace chainrule::emu::detail

namespace chainrule::port {

// Asynchronous global -> shared copy of Bytes (4, 8 or 16); bytes past src_bytes are zero-filled.
template <int Bytes>
inline void cp_async(void* smem_dst, const void* gmem_src, int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  using namespace chainrule::emu::detail;
  Fiber& self = current_thread("cp_async");
  check_aligned(smem_dst, Bytes, "a cp.async destination");
  check_aligned(gmem_src, Bytes, "a cp.async source");
  if (src_bytes < 0 || src_bytes > Bytes)
    fail("cp.async src_bytes " + std::to_string(src_bytes) + " is outside [0, " + std::to_string(Bytes) + "]");
  {
    InternalAccess internal;
    PendingCopy& copy = self.copies.emplace_back();
    copy.dst = smem_dst;
    copy.bytes = Bytes;
    copy.group = self.committed_groups;
    std::memset(copy.data, 0, sizeof copy.data);
  }
#if CHAINRULE_EMU_TSAN
  if (src_bytes > 0) __tsan_read_range(const_cast<void*>(gmem_src), static_cast<unsigned long>(src_bytes));
#endif
  {
    InternalAccess internal;
    if (src_bytes > 0) std::memcpy(self.copies.back().data, gmem_src, static_cast<size_t>(src_bytes));
  }
  std::memset(smem_dst, 0xff, Bytes);  // the destination is written at issue (poison), and again when it lands
}

inline void cp_async_commit() {
  using namespace chainrule::emu::detail;
  ++current_thread("cp_async_commit").committed_groups;
}

// cp.async.wait_group N: all but the N most recent committed groups have landed.
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes N >= 0");
  using namespace chainrule::emu::detail;
  Fiber& self = current_thread("cp_async_wait");
  if (self.committed_groups > static_cast<uint64_t>(N)) land_copies(self, self.committed_groups - N);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row, std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<1, false>(r, smem_row, site);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row, std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<2, false>(r, smem_row, site);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<4, false>(r, smem_row, site);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<1, true>(r, smem_row, site);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<2, true>(r, smem_row, site);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row,
                              std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::ldmatrix<4, true>(r, smem_row, site);
}

// D = A·B + C, A 16x16 row-major, B 16x8 column-major, fp32 accumulate.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::mma<T, true>(d, a, b, c, site);
}
template <typename T>
inline void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1], const float (&c)[4],
                        std::source_location site = std::source_location::current()) {
  chainrule::emu::detail::mma<T, false>(d, a, b, c, site);
}

// The block's dynamic shared memory (128-byte aligned, poisoned with 0xff at block start).
template <typename T>
inline T* dynamic_shared() {
  using namespace chainrule::emu::detail;
  current_thread("dynamic_shared");
  return reinterpret_cast<T*>(t_block->dynamic_smem);
}

// Vector loads and stores that must be aligned to the vector type (float4, uint4, __half2, ...):
// a plain dereference on the GPU, an alignment check under the emulator.
template <typename V>
inline V load_vector(const V* address) {
  chainrule::emu::detail::check_aligned(address, alignof(V), "a vector load");
  return *address;
}
template <typename V>
inline void store_vector(V* address, const V& value) {
  chainrule::emu::detail::check_aligned(address, alignof(V), "a vector store");
  *address = value;
}

}  // namespace chainrule::port
