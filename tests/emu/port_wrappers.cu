// Every chainrule::port wrapper in one kernel, so nvcc assembles each inline-PTX instruction for
// sm_80 and sm_90 (compiled by tests/test_emulator.py; nothing runs).
#include "cuda/port.cuh"

using namespace chainrule::port;

__global__ void every_port_wrapper(const float* global, float* out) {
  __shared__ __align__(16) unsigned short smem[32 * 8 * 4];
  const unsigned t = threadIdx.x;
  cp_async<16>(smem + t * 8, global + t * 4);
  cp_async<8>(smem + t * 4, global, 4);
  cp_async<4>(smem + t * 2, global, 0);
  cp_async_commit();
  cp_async_wait<1>();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t r1[1], r2[2], r4[4];
  ldmatrix_x1(r1, smem + t * 8);
  ldmatrix_x2(r2, smem + t * 8);
  ldmatrix_x4(r4, smem + t * 8);
  ldmatrix_x1_trans(r1, smem + t * 8);
  ldmatrix_x2_trans(r2, smem + t * 8);
  ldmatrix_x4_trans(r4, smem + t * 8);
  const float zero[4] = {0, 0, 0, 0};
  float d[4];
  mma_m16n8k16<__nv_bfloat16>(d, r4, r2, zero);
  mma_m16n8k16<__half>(d, r4, r2, d);
  const uint32_t a2[2] = {r2[0], r2[1]};
  mma_m16n8k8<__nv_bfloat16>(d, a2, r1, d);
  mma_m16n8k8<__half>(d, a2, r1, d);
  float* dynamic = dynamic_shared<float>();
  dynamic[t] = d[0];
  __syncthreads();
  const float4 v = load_vector(reinterpret_cast<const float4*>(global) + t);
  store_vector(reinterpret_cast<float4*>(out) + t, v);
  out[t] += d[1] + d[2] + d[3] + dynamic[t ^ 1u] + __shfl_xor_sync(0xffffffffu, d[0], 1, 16) +
            static_cast<float>(__ballot_sync(0xffffffffu, d[0] > 0) + __syncthreads_count(d[1] > 0));
  atomicAdd(out, 1.0f);
  atomicMax(reinterpret_cast<int*>(out) + 1, 3);
  atomicCAS(reinterpret_cast<int*>(out) + 2, 0, 1);
}
