// One small kernel per chainrule::port wrapper, for tests/cuda_port/port_check.cu: compiled by nvcc
// (port_check.cu, the inline PTX on a GPU) and by the host compiler (port_emulated.cpp, the
// emulator), so the same source runs both ways and the two results are compared word for word.
//
// Every kernel is one warp with the signature (const uint32_t* in, uint32_t* out); the layout of
// `in` and `out` per kind is written next to each kernel and built by port_cases.h. The kernels live
// in an unnamed namespace: each translation unit gets its own copy (a __global__ function in one, a
// plain function in the other) without a clash at link time. Include after "cuda/port.cuh".
#pragma once

#include <cstdint>

namespace {

namespace port = chainrule::port;

// ---------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 matrices of 16-bit values in shared memory, rows kLdmatrixRowStride elements
// apart (48 bytes: every row stays 16-byte aligned); `in` is their content (kLdmatrixWords words).
// Lane 8*j + r passes logical row r of matrix j, stored at physical row ldmatrix_row(j, r), so a
// wrong lane-to-row mapping shows. out[4 * lane + j] = register j of the lane (0 when unused).
constexpr int kLdmatrixRowStride = 24;
constexpr int kLdmatrixWords = 4 * 8 * kLdmatrixRowStride / 2;
__host__ __device__ inline int ldmatrix_row(int matrix, int row) { return (row * 5 + matrix * 3) % 8; }

template <int Count, bool Trans>
__global__ void ldmatrix_kernel(const uint32_t* in, uint32_t* out) {
  __shared__ __align__(16) uint32_t smem[kLdmatrixWords];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < kLdmatrixWords; i += 32) smem[i] = in[i];
  __syncwarp();
  const int matrix = (lane / 8) % Count;
  const auto* rows = reinterpret_cast<const uint16_t*>(smem);
  const uint16_t* row_address = rows + (matrix * 8 + ldmatrix_row(matrix, lane % 8)) * kLdmatrixRowStride;
  uint32_t r[4] = {0, 0, 0, 0};
  if constexpr (Count == 1) {
    uint32_t(&r1)[1] = reinterpret_cast<uint32_t(&)[1]>(r);
    if constexpr (Trans) port::ldmatrix_x1_trans(r1, row_address); else port::ldmatrix_x1(r1, row_address);
  } else if constexpr (Count == 2) {
    uint32_t(&r2)[2] = reinterpret_cast<uint32_t(&)[2]>(r);
    if constexpr (Trans) port::ldmatrix_x2_trans(r2, row_address); else port::ldmatrix_x2(r2, row_address);
  } else {
    if constexpr (Trans) port::ldmatrix_x4_trans(r, row_address); else port::ldmatrix_x4(r, row_address);
  }
  for (int j = 0; j < 4; ++j) out[4 * lane + j] = r[j];
}

// ---------------------------------------------------------------------------------------------
// mma.sync: in[kMmaWordsPerLane * lane + ...] = the lane's A registers (4, of which m16n8k8 uses 2),
// B registers (2, m16n8k8 uses 1) and C (4 floats, as bits); out[4 * lane + i] = D element i.
constexpr int kMmaWordsPerLane = 10;

template <typename T, bool K16>
__global__ void mma_kernel(const uint32_t* in, uint32_t* out) {
  const int lane = static_cast<int>(threadIdx.x);
  const uint32_t* mine = in + kMmaWordsPerLane * lane;
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = __uint_as_float(mine[6 + i]);
  if constexpr (K16) {
    const uint32_t a[4] = {mine[0], mine[1], mine[2], mine[3]};
    const uint32_t b[2] = {mine[4], mine[5]};
    port::mma_m16n8k16<T>(d, a, b, c);
  } else {
    const uint32_t a[2] = {mine[0], mine[1]};
    const uint32_t b[1] = {mine[4]};
    port::mma_m16n8k8<T>(d, a, b, c);
  }
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = __float_as_uint(d[i]);
}

// ---------------------------------------------------------------------------------------------
// cp.async: every lane issues kCopyGroups commit groups of one Bytes-sized copy each, group g from
// in + (32 g + lane) * Bytes with src_bytes = (lane + g) % (Bytes + 1) (so the warp covers every
// source size from 0 to Bytes), into shared memory first filled with kCopyFill. After
// cp.async.wait_group WaitGroups the oldest kCopyGroups - WaitGroups groups must have landed: the
// lane copies those to out (same offsets); the others' words of out are left as they were.
constexpr int kCopyGroups = 4;
constexpr uint32_t kCopyFill = 0xa5a5a5a5u;
constexpr int kCopyWords = kCopyGroups * 32 * 16 / 4;  // enough for 16-byte copies

template <int Bytes, int WaitGroups>
__global__ void cp_async_kernel(const uint32_t* in, uint32_t* out) {
  __shared__ __align__(16) uint32_t smem[kCopyWords];
  constexpr int kWords = Bytes / 4;
  const int lane = static_cast<int>(threadIdx.x);
  for (int g = 0; g < kCopyGroups; ++g)
    for (int w = 0; w < kWords; ++w) smem[(32 * g + lane) * kWords + w] = kCopyFill;
  const auto* source = reinterpret_cast<const unsigned char*>(in);
  for (int g = 0; g < kCopyGroups; ++g) {
    const int slot = 32 * g + lane;
    port::cp_async<Bytes>(smem + slot * kWords, source + slot * Bytes, (lane + g) % (Bytes + 1));
    port::cp_async_commit();
  }
  port::cp_async_wait<WaitGroups>();
  // A lane reads only its own copies: wait_group orders them for the issuing thread.
  for (int g = 0; g < kCopyGroups - WaitGroups; ++g)
    for (int w = 0; w < kWords; ++w) out[(32 * g + lane) * kWords + w] = smem[(32 * g + lane) * kWords + w];
  port::cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Every case: its name and kernel, in the order of port_cases.h's case table.
using PortKernel = void (*)(const uint32_t*, uint32_t*);
struct PortKernelEntry {
  const char* name;
  PortKernel kernel;
};

template <int Bytes>
constexpr PortKernelEntry cp_async_entry(int wait_groups) {
  switch (wait_groups) {
    case 0: return {"cp_async", cp_async_kernel<Bytes, 0>};
    case 1: return {"cp_async", cp_async_kernel<Bytes, 1>};
    case 2: return {"cp_async", cp_async_kernel<Bytes, 2>};
    default: return {"cp_async", cp_async_kernel<Bytes, 3>};
  }
}

inline const PortKernelEntry kPortKernels[] = {
    {"ldmatrix_x1", ldmatrix_kernel<1, false>},
    {"ldmatrix_x2", ldmatrix_kernel<2, false>},
    {"ldmatrix_x4", ldmatrix_kernel<4, false>},
    {"ldmatrix_x1_trans", ldmatrix_kernel<1, true>},
    {"ldmatrix_x2_trans", ldmatrix_kernel<2, true>},
    {"ldmatrix_x4_trans", ldmatrix_kernel<4, true>},
    {"mma_m16n8k16_bf16", mma_kernel<__nv_bfloat16, true>},
    {"mma_m16n8k16_f16", mma_kernel<__half, true>},
    {"mma_m16n8k8_bf16", mma_kernel<__nv_bfloat16, false>},
    {"mma_m16n8k8_f16", mma_kernel<__half, false>},
    cp_async_entry<4>(0), cp_async_entry<4>(1), cp_async_entry<4>(2), cp_async_entry<4>(3),
    cp_async_entry<8>(0), cp_async_entry<8>(1), cp_async_entry<8>(2), cp_async_entry<8>(3),
    cp_async_entry<16>(0), cp_async_entry<16>(1), cp_async_entry<16>(2), cp_async_entry<16>(3),
};

}  // namespace
