// ldmatrix and mma.sync against the PTX ISA's fragment layouts, element by element.
//   ldmatrix .m8n8 .b16: lane 8*j + r gives the address of row r of matrix j; register j of lane l
//     holds row l/4, columns 2*(l%4) and 2*(l%4)+1 of matrix j (low half first); .trans delivers
//     the transpose.
//   mma.m16n8k16 (g = lane/4, t = lane%4): A element i at (g + 8*((i/2)%2), 2t + i%2 + 8*(i/4)),
//     B element i at (2t + i%2 + 8*(i/2), g), C/D element i at (g + 8*(i/2), 2t + i%2).
//   mma.m16n8k8: A element i at (g + 8*(i/2), 2t + i%2), B element i at (2t + i, g), C/D as above.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "cuda/port.cuh"

namespace emu = chainrule::emu;
namespace port = chainrule::port;

namespace {

// Four 8x8 matrices of 16-bit values in shared memory, rows 24 elements apart (48 bytes, so
// every row stays 16-byte aligned), with value = 1000*matrix + 10*row + column. Each lane points at
// a row chosen through a permutation, so a wrong lane-to-row mapping shows.
constexpr int kRowStride = 24;
__host__ __device__ inline int permuted_row(int matrix, int row) { return (row * 5 + matrix * 3) % 8; }

template <int Count, bool Trans>
__global__ void ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t smem[4 * 8 * kRowStride];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 4 * 8 * kRowStride; i += 32) {
    const int matrix = i / (8 * kRowStride), row = i / kRowStride % 8, col = i % kRowStride;
    smem[i] = static_cast<uint16_t>(1000 * matrix + 10 * row + col);
  }
  __syncwarp();
  // lane 8*j + r addresses logical row r of matrix j, stored at physical row permuted_row(j, r)
  const int matrix = (lane / 8) % Count, logical_row = lane % 8;
  const uint16_t* row_address = smem + (matrix * 8 + permuted_row(matrix, logical_row)) * kRowStride;
  uint32_t r[4] = {0, 0, 0, 0};
  if constexpr (Count == 1) {
    uint32_t (&r1)[1] = reinterpret_cast<uint32_t (&)[1]>(r);
    if constexpr (Trans) port::ldmatrix_x1_trans(r1, row_address); else port::ldmatrix_x1(r1, row_address);
  } else if constexpr (Count == 2) {
    uint32_t (&r2)[2] = reinterpret_cast<uint32_t (&)[2]>(r);
    if constexpr (Trans) port::ldmatrix_x2_trans(r2, row_address); else port::ldmatrix_x2(r2, row_address);
  } else {
    if constexpr (Trans) port::ldmatrix_x4_trans(r, row_address); else port::ldmatrix_x4(r, row_address);
  }
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

template <int Count, bool Trans>
void check_ldmatrix() {
  std::vector<uint32_t> out(128, 0xdeadbeef);
  emu::launch("ldmatrix_kernel", ldmatrix_kernel<Count, Trans>, dim3(1), dim3(32), 0, out.data());
  // logical (row, col) of matrix j holds the value stored at physical row permuted_row(j, row)
  auto value = [](int j, int row, int col) { return static_cast<uint32_t>(1000 * j + 10 * permuted_row(j, row) + col); };
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) {
      const uint32_t got = out[lane * 4 + j];
      if (j >= Count) {
        CHECK_EQ(got, 0u);
        continue;
      }
      const int a = lane / 4, b = 2 * (lane % 4);
      const uint32_t low = Trans ? value(j, b, a) : value(j, a, b);
      const uint32_t high = Trans ? value(j, b + 1, a) : value(j, a, b + 1);
      CHECK_EQ(got & 0xffffu, low);
      CHECK_EQ(got >> 16, high);
    }
  }
}

template <typename T>
uint16_t to_bits16(float x) {
  T v = std::is_same_v<T, __half> ? T(__float2half_rn(x)) : T(__float2bfloat16_rn(x));
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  return bits;
}
template <typename T>
double from_bits16(uint16_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v); else return __bfloat162float(v);
}

struct MmaIn {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};

template <typename T, bool K16>
__global__ void mma_kernel(const MmaIn* in, float* d) {
  const int lane = static_cast<int>(threadIdx.x);
  float acc[4];
  const float(&c)[4] = in->c[lane];
  if constexpr (K16) {
    port::mma_m16n8k16<T>(acc, in->a[lane], in->b[lane], c);
  } else {
    const uint32_t a[2] = {in->a[lane][0], in->a[lane][1]};
    const uint32_t b[1] = {in->b[lane][0]};
    port::mma_m16n8k8<T>(acc, a, b, c);
  }
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

// Packs A (16 x K), B (K x 8) and C (16 x 8) into fragments with the layouts in the header comment,
// runs one mma, unpacks D and compares every element with A·B + C in fp64.
template <typename T, bool K16>
void check_mma(int seed, bool small_integers) {
  constexpr int K = K16 ? 16 : 8;
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::uniform_int_distribution<int> small(-4, 4);
  double A[16][16], B[16][8], C[16][8];
  uint16_t a_bits[16][16], b_bits[16][8];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < K; ++k) {
      a_bits[r][k] = to_bits16<T>(small_integers ? static_cast<float>(small(rng)) : uniform(rng));
      A[r][k] = from_bits16<T>(a_bits[r][k]);
    }
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 8; ++n) {
      b_bits[k][n] = to_bits16<T>(small_integers ? static_cast<float>(small(rng)) : uniform(rng));
      B[k][n] = from_bits16<T>(b_bits[k][n]);
    }
  MmaIn in{};
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) C[r][n] = small_integers ? small(rng) : static_cast<float>(uniform(rng));
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    auto put = [](uint32_t* regs, int i, uint16_t bits) { regs[i / 2] |= static_cast<uint32_t>(bits) << (16 * (i % 2)); };
    if (K16) {
      for (int i = 0; i < 8; ++i) put(in.a[lane], i, a_bits[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)]);
      for (int i = 0; i < 4; ++i) put(in.b[lane], i, b_bits[2 * t + i % 2 + 8 * (i / 2)][g]);
    } else {
      for (int i = 0; i < 4; ++i) put(in.a[lane], i, a_bits[g + 8 * (i / 2)][2 * t + i % 2]);
      for (int i = 0; i < 2; ++i) put(in.b[lane], i, b_bits[2 * t + i][g]);
    }
    for (int i = 0; i < 4; ++i) in.c[lane][i] = static_cast<float>(C[g + 8 * (i / 2)][2 * t + i % 2]);
  }
  std::vector<float> d(128);
  emu::launch("mma_kernel", mma_kernel<T, K16>, dim3(1), dim3(32), 0, &in, d.data());
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      double expected = C[row][col];
      double magnitude = std::fabs(C[row][col]);
      for (int k = 0; k < K; ++k) {
        expected += A[row][k] * B[k][col];
        magnitude += std::fabs(A[row][k] * B[k][col]);
      }
      if (small_integers) {
        CHECK_EQ(static_cast<double>(d[lane * 4 + i]), expected);  // exact: every partial sum is an integer
      } else {
        CHECK_NEAR(d[lane * 4 + i], expected, 1e-6 * magnitude + 1e-6);
      }
    }
  }
}

// The usual tensor-core tile: A (16x16, row-major) with ldmatrix_x4, B stored k-major (16 rows of
// 8) with ldmatrix_x2_trans, one m16n8k16.
__global__ void ldmatrix_mma_tile(const __nv_bfloat16* a, const __nv_bfloat16* b, float* d) {
  __shared__ __align__(16) __nv_bfloat16 sa[16 * 16];
  __shared__ __align__(16) __nv_bfloat16 sb[16 * 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) sb[i] = b[i];
  __syncwarp();
  uint32_t a_frag[4], b_frag[2];
  // x4 matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  port::ldmatrix_x4(a_frag, sa + (lane % 16) * 16 + (lane / 16) * 8);
  // x2 trans: matrices k 0-7 and k 8-15 of B, addressed by k rows
  port::ldmatrix_x2_trans(b_frag, sb + (lane % 16) * 8);
  const float zero[4] = {0, 0, 0, 0};
  float acc[4];
  port::mma_m16n8k16<__nv_bfloat16>(acc, a_frag, b_frag, zero);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

}  // namespace

TEST(mma_ldmatrix_x1) { check_ldmatrix<1, false>(); }
TEST(mma_ldmatrix_x2) { check_ldmatrix<2, false>(); }
TEST(mma_ldmatrix_x4) { check_ldmatrix<4, false>(); }
TEST(mma_ldmatrix_x1_trans) { check_ldmatrix<1, true>(); }
TEST(mma_ldmatrix_x2_trans) { check_ldmatrix<2, true>(); }
TEST(mma_ldmatrix_x4_trans) { check_ldmatrix<4, true>(); }

TEST(mma_m16n8k16_bf16) {
  check_mma<__nv_bfloat16, true>(1, true);
  check_mma<__nv_bfloat16, true>(2, false);
}
TEST(mma_m16n8k16_f16) {
  check_mma<__half, true>(3, true);
  check_mma<__half, true>(4, false);
}
TEST(mma_m16n8k8_bf16) {
  check_mma<__nv_bfloat16, false>(5, true);
  check_mma<__nv_bfloat16, false>(6, false);
}
TEST(mma_m16n8k8_f16) {
  check_mma<__half, false>(7, true);
  check_mma<__half, false>(8, false);
}

TEST(mma_ldmatrix_then_mma_tile) {
  std::vector<__nv_bfloat16> a(256), b(128);
  double A[16][16], B[16][8];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) {
      a[r * 16 + k] = __float2bfloat16(static_cast<float>((r * 3 + k * 5) % 7 - 3));
      A[r][k] = __bfloat162float(a[r * 16 + k]);
    }
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) {
      b[k * 8 + n] = __float2bfloat16(static_cast<float>((k * 2 + n * 7) % 5 - 2));
      B[k][n] = __bfloat162float(b[k * 8 + n]);
    }
  std::vector<float> d(128);
  emu::launch("ldmatrix_mma_tile", ldmatrix_mma_tile, dim3(1), dim3(32), 0, a.data(), b.data(), d.data());
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n) {
      double expected = 0;
      for (int k = 0; k < 16; ++k) expected += A[r][k] * B[k][n];
      CHECK_EQ(static_cast<double>(d[r * 8 + n]), expected);
    }
}
