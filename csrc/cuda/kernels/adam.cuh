// Multi-tensor fused Adam / AdamW: one launch updates any number of tensors.
//
// torch's _fused_adam_ and apex's FusedAdam pass tensor addresses in the kernel's 4 KB parameter
// space, so one launch covers a few dozen tensors. Here the launcher writes one AdamTensorMeta
// per tensor into a device buffer (cached while the parameter set is unchanged, see
// csrc/cuda/adam_plan.h) and the kernel reads it, so the launch size is independent of the
// number of tensors:
//
//   * every tensor is cut into chunks of kAdamChunk elements; chunk_starts[t] is the index of
//     tensor t's first chunk in the concatenation of all chunks (a prefix sum, n + 1 entries);
//   * block b owns the contiguous chunk range [b * C / G, (b + 1) * C / G): it finds its first
//     tensor by binary search over chunk_starts and then walks forward;
//   * inside a chunk, 16-byte vector loads and stores of the parameters, gradients and states,
//     with scalar heads and tails where the tensors do not start on a 16-byte boundary (a tensor
//     whose pointers cannot all be aligned together is done element by element);
//   * the element update is chainrule::adam_update_element (csrc/include/chainrule/adam_math.h),
//     the same function the CPU kernel calls, so float32 results are bitwise identical;
//   * found_inf, grad_scale, lr (optionally a tensor) and the per-tensor step counts are read on
//     the device: the launcher never reads a device value, so a step can be captured in a CUDA
//     graph (capturable=True);
//   * the step counts are advanced by the last block to finish (a completion counter that the
//     launcher allocates zeroed for each launch): every block reads step + 1 before any step
//     changes, all in one launch.
//
// Bytes moved per parameter and the expected time on an H100: ARCHITECTURE.md, "Adam kernels".
#pragma once

#include <cstdint>

#include "chainrule/adam_math.h"
#include "cuda/port.cuh"

namespace chainrule::kernels::adam {

// ---------------------------------------------------------------------------------------------
// Launch geometry and metadata layout (shared with the host planner).

constexpr int kThreads = 256;
// Elements per chunk: a multiple of every vector width (2, 4 and 8 elements), large enough that
// the per-chunk bookkeeping (tensor lookup, scalar head and tail) is noise, small enough that a
// 1000-tensor model still yields thousands of chunks to spread over the SMs.
constexpr int64_t kChunk = 16384;

enum class ParamDtype : int32_t { float32 = 0, bfloat16 = 1, float16 = 2, float64 = 3 };

// One per tensor; the layout is the same on host and device (plain pointers and integers).
struct TensorMeta {
  void* param;           // ParamDtype elements
  void* exp_avg;         // float32 (float64 for float64 params)
  void* exp_avg_sq;      // same type as exp_avg
  void* max_exp_avg_sq;  // same type as exp_avg; nullptr unless amsgrad
  float* master;         // float32 master copy of a bfloat16/float16 param, or nullptr
  void* step;            // scalar step count, float32 or float64 (KernelParams::step_is_double)
  int64_t numel;
  int32_t dtype;         // ParamDtype
  int32_t reserved;
};

struct KernelParams {
  const TensorMeta* tensors;     // num_tensors entries, cached across steps
  const int64_t* chunk_starts;   // num_tensors + 1 prefix sums of chunks per tensor
  const void* const* grads;      // num_tensors gradient addresses (re-uploaded when they change)
  unsigned int* blocks_done;     // completion counter, zero at launch, one per launch
  int32_t num_tensors;
  int64_t num_chunks;
  AdamOptions options;
  double lr;                     // used when lr_tensor is nullptr
  const void* lr_tensor;         // scalar float32 / float64 on the device, or nullptr
  bool lr_is_double;
  bool step_is_double;
  const float* grad_scale;       // nullptr: no unscaling
  const float* found_inf;        // nullptr: never skip
};

// ---------------------------------------------------------------------------------------------
// Device helpers.

// 16 bytes of T, loaded and stored as one 128-bit access (the pointer must be 16-byte aligned).
template <typename T>
struct alignas(16) Pack {
  static constexpr int size = 16 / static_cast<int>(sizeof(T));
  T v[size];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  return port::load_vector(reinterpret_cast<const Pack<T>*>(ptr));
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack) {
  port::store_vector(reinterpret_cast<Pack<T>*>(ptr), pack);
}

// bfloat16 and float16 parameters travel as raw 16-bit patterns and share one code path, the
// format being a per-tensor (so warp-uniform) flag. With a separate path per format ptxas gave
// the kernel 116 registers (two resident blocks per SM); with two paths (32-bit, 16-bit) it
// fits the 80 that three blocks allow, without spills.
__device__ __forceinline__ float bits16_to_float(uint16_t bits, bool bfloat16) {
  if (bfloat16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

__device__ __forceinline__ uint16_t float_to_bits16(float x, bool bfloat16) {
  // Both conversions round to nearest even.
  if (bfloat16) return static_cast<__nv_bfloat16_raw>(__float2bfloat16(x)).x;
  return static_cast<__half_raw>(__float2half(x)).x;
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

template <typename Math>
__device__ __forceinline__ AdamScalars<Math> tensor_scalars(const KernelParams& p,
                                                            const TensorMeta& meta) {
  const double previous_step = p.step_is_double ? *static_cast<const double*>(meta.step)
                                                : static_cast<double>(*static_cast<const float*>(meta.step));
  double lr = p.lr;
  if (p.lr_tensor != nullptr) {
    lr = p.lr_is_double ? *static_cast<const double*>(p.lr_tensor)
                        : static_cast<double>(*static_cast<const float*>(p.lr_tensor));
  }
  return adam_scalars<Math>(p.options, lr, static_cast<int64_t>(previous_step) + 1, p.grad_scale);
}

// ---------------------------------------------------------------------------------------------
// One chunk [begin, end) of one tensor. P is the parameter type, S the state type (Math).
//
// Parameters in float32 / float64 are updated in place. bfloat16 / float16 parameters are
// widened to float, updated, and rounded back; with a master copy the float32 master is the
// value that is updated and the parameter receives its rounding.

template <typename P, typename S>
struct ChunkPointers {
  P* param;
  const P* grad;
  S* exp_avg;
  S* exp_avg_sq;
  S* max_exp_avg_sq;  // nullptr unless amsgrad
  float* master;      // nullptr unless a master copy is kept
  bool bfloat16;      // P == uint16_t: bfloat16 rather than float16 bits
};

template <typename P, typename S>
__device__ __forceinline__ void update_scalar(const ChunkPointers<P, S>& t, int64_t i,
                                              const AdamScalars<S>& s) {
  S param;
  if constexpr (sizeof(P) == sizeof(S)) {
    param = t.param[i];
  } else {
    param = t.master != nullptr ? t.master[i] : bits16_to_float(t.param[i], t.bfloat16);
  }
  S grad;
  if constexpr (sizeof(P) == sizeof(S)) grad = t.grad[i]; else grad = bits16_to_float(t.grad[i], t.bfloat16);
  S exp_avg = t.exp_avg[i], exp_avg_sq = t.exp_avg_sq[i];
  S max_sq = t.max_exp_avg_sq != nullptr ? t.max_exp_avg_sq[i] : S(0);
  adam_update_element<S>(param, grad, exp_avg, exp_avg_sq, max_sq, s);
  t.exp_avg[i] = exp_avg;
  t.exp_avg_sq[i] = exp_avg_sq;
  if (t.max_exp_avg_sq != nullptr) t.max_exp_avg_sq[i] = max_sq;
  if constexpr (sizeof(P) == sizeof(S)) {
    t.param[i] = param;
  } else {
    if (t.master != nullptr) t.master[i] = param;
    t.param[i] = float_to_bits16(param, t.bfloat16);
  }
}

// W = 16 / sizeof(P) elements starting at i, which is 16-byte aligned for every pointer. For
// 16-bit params the float states of the W = 8 elements are two 16-byte packs each; they are done
// one pack at a time, which keeps the live registers (and so the occupancy) of the float32 path.
template <typename P, typename S>
__device__ __forceinline__ void update_vector(const ChunkPointers<P, S>& t, int64_t i,
                                              const AdamScalars<S>& s) {
  constexpr int kWidth = Pack<P>::size;
  constexpr int kPerPack = Pack<S>::size;
  constexpr int kStatePacks = kWidth / kPerPack;  // 16-byte state packs per parameter pack
  const bool amsgrad = t.max_exp_avg_sq != nullptr;
  const Pack<P> grad = load_pack(t.grad + i);
  Pack<P> param_io;
  if (sizeof(P) == sizeof(S) || t.master == nullptr) param_io = load_pack(t.param + i);

  for (int k = 0; k < kStatePacks; ++k) {
    const int64_t j = i + k * kPerPack;
    Pack<S> exp_avg = load_pack(t.exp_avg + j);
    Pack<S> exp_avg_sq = load_pack(t.exp_avg_sq + j);
    Pack<S> max_sq;
    if (amsgrad) max_sq = load_pack(t.max_exp_avg_sq + j);
    Pack<S> param;
    if constexpr (sizeof(P) == sizeof(S)) {
      param = reinterpret_cast<const Pack<S>&>(param_io);
    } else if (t.master != nullptr) {
      param = load_pack(t.master + j);
    } else {
      for (int e = 0; e < kPerPack; ++e) param.v[e] = bits16_to_float(param_io.v[k * kPerPack + e], t.bfloat16);
    }
    for (int e = 0; e < kPerPack; ++e) {
      S grad_e;
      if constexpr (sizeof(P) == sizeof(S)) grad_e = grad.v[e]; else grad_e = bits16_to_float(grad.v[k * kPerPack + e], t.bfloat16);
      adam_update_element<S>(param.v[e], grad_e, exp_avg.v[e], exp_avg_sq.v[e], max_sq.v[e], s);
    }
    store_pack(t.exp_avg + j, exp_avg);
    store_pack(t.exp_avg_sq + j, exp_avg_sq);
    if (amsgrad) store_pack(t.max_exp_avg_sq + j, max_sq);
    if constexpr (sizeof(P) == sizeof(S)) {
      param_io = reinterpret_cast<const Pack<P>&>(param);
    } else {
      if (t.master != nullptr) store_pack(t.master + j, param);
      for (int e = 0; e < kPerPack; ++e) param_io.v[k * kPerPack + e] = float_to_bits16(param.v[e], t.bfloat16);
    }
  }
  store_pack(t.param + i, param_io);
}

template <typename P, typename S>
__device__ __forceinline__ void update_chunk(const ChunkPointers<P, S>& t, int64_t begin,
                                             int64_t end, const AdamScalars<S>& s) {
  constexpr int kWidth = Pack<P>::size;
  // The first index at which the parameter is 16-byte aligned; chunks start at multiples of
  // kWidth, so every chunk has the same head. Every other pointer must be aligned there too.
  const int64_t head_in_tensor =
      static_cast<int64_t>((16u - (reinterpret_cast<uintptr_t>(t.param) & 15u)) & 15u) /
      static_cast<int64_t>(sizeof(P));
  const bool vectorizable =
      reinterpret_cast<uintptr_t>(t.param) % sizeof(P) == 0 &&
      aligned16(t.grad + head_in_tensor) && aligned16(t.exp_avg + head_in_tensor) &&
      aligned16(t.exp_avg_sq + head_in_tensor) &&
      (t.max_exp_avg_sq == nullptr || aligned16(t.max_exp_avg_sq + head_in_tensor)) &&
      (t.master == nullptr || aligned16(t.master + head_in_tensor));
  int64_t vector_begin = end;
  if (vectorizable) vector_begin = begin + head_in_tensor < end ? begin + head_in_tensor : end;
  const int64_t num_vectors = (end - vector_begin) / kWidth;
  const int64_t vector_end = vector_begin + num_vectors * kWidth;

  for (int64_t i = begin + threadIdx.x; i < vector_begin; i += blockDim.x) update_scalar(t, i, s);
  for (int64_t v = threadIdx.x; v < num_vectors; v += blockDim.x) {
    update_vector(t, vector_begin + v * kWidth, s);
  }
  for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) update_scalar(t, i, s);
}

template <typename P, typename S>
__device__ __forceinline__ ChunkPointers<P, S> chunk_pointers(const KernelParams& p,
                                                              const TensorMeta& meta, int tensor) {
  ChunkPointers<P, S> t;
  t.param = static_cast<P*>(meta.param);
  t.grad = static_cast<const P*>(p.grads[tensor]);
  t.exp_avg = static_cast<S*>(meta.exp_avg);
  t.exp_avg_sq = static_cast<S*>(meta.exp_avg_sq);
  t.max_exp_avg_sq = static_cast<S*>(meta.max_exp_avg_sq);
  t.master = meta.master;
  t.bfloat16 = meta.dtype == static_cast<int32_t>(ParamDtype::bfloat16);
  return t;
}

// ---------------------------------------------------------------------------------------------
// The kernel. Math is float for float32/bfloat16/float16 parameters (which may be mixed in one
// launch: the dtype is per tensor) and double for float64 parameters.

// Three resident blocks per SM for float math (<= 80 registers, no spills on sm_90; 768 threads
// with five 16-byte loads each in flight cover the latency of an HBM3 stream); double math is
// for tests and needs more registers.
template <typename Math>
__global__ void __launch_bounds__(kThreads, sizeof(Math) == sizeof(float) ? 3 : 2)
    multi_tensor_adam_kernel(KernelParams p) {
  // GradScaler found an inf/nan: nothing changes, not even the step counts.
  if (p.found_inf != nullptr && *p.found_inf != 0.0f) return;

  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) * p.num_chunks / gridDim.x;
  const int64_t chunk_end = static_cast<int64_t>(blockIdx.x + 1) * p.num_chunks / gridDim.x;

  if (chunk_begin < chunk_end) {
    // The tensor holding chunk_begin: the last t with chunk_starts[t] <= chunk_begin (empty
    // tensors have chunk_starts[t] == chunk_starts[t + 1] and are skipped by the walk below).
    int lo = 0, hi = p.num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.chunk_starts[mid] <= chunk_begin) lo = mid; else hi = mid - 1;
    }
    int tensor = lo;
    int scalars_tensor = -1;
    AdamScalars<Math> s;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      while (chunk >= p.chunk_starts[tensor + 1]) ++tensor;
      const TensorMeta& meta = p.tensors[tensor];
      if (scalars_tensor != tensor) {
        s = tensor_scalars<Math>(p, meta);
        scalars_tensor = tensor;
      }
      const int64_t begin = (chunk - p.chunk_starts[tensor]) * kChunk;
      const int64_t end = begin + kChunk < meta.numel ? begin + kChunk : meta.numel;
      if constexpr (sizeof(Math) == sizeof(double)) {
        update_chunk(chunk_pointers<double, double>(p, meta, tensor), begin, end, s);
      } else {
        if (meta.dtype == static_cast<int32_t>(ParamDtype::float32)) {
          update_chunk(chunk_pointers<float, float>(p, meta, tensor), begin, end, s);
        } else {  // bfloat16 or float16
          update_chunk(chunk_pointers<uint16_t, float>(p, meta, tensor), begin, end, s);
        }
      }
    }
  }

  // The last block to finish advances every step count; all blocks have read theirs by then.
  // The barrier orders every thread's step reads before this block's count.
  __syncthreads();
  int is_last = 0;
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(p.blocks_done, 1u) == gridDim.x - 1;
  }
  if (!__syncthreads_or(is_last)) return;
  __threadfence();
  for (int t = threadIdx.x; t < p.num_tensors; t += blockDim.x) {
    void* step = p.tensors[t].step;
    if (p.step_is_double) {
      *static_cast<double*>(step) += 1.0;
    } else {
      *static_cast<float*>(step) += 1.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata uploads while a CUDA graph is captured: the bytes travel in the kernel's parameters,
// which the graph keeps, instead of in host memory that a captured copy would read at replay.

struct ByteUpload {
  static constexpr int kCapacity = 4096 - 64;  // under the 4 KiB parameter limit
  uint8_t* destination;
  int32_t bytes;
  uint8_t data[kCapacity];
};

// A template only so that the header can define it in every translation unit.
template <typename Upload = ByteUpload>
__global__ void __launch_bounds__(kThreads) upload_bytes_kernel(Upload u) {
  for (int i = static_cast<int>(threadIdx.x); i < u.bytes; i += static_cast<int>(blockDim.x)) {
    u.destination[i] = u.data[i];
  }
}

}  // namespace chainrule::kernels::adam
