// Host-side planning of the multi-tensor Adam kernel (csrc/cuda/kernels/adam.cuh), written once
// and shared by the CUDA launcher (csrc/cuda/adam.cu, <<<>>>) and its emulated twin
// (csrc/emulated/adam.cpp, chainrule::emu::launch).
//
// The planner turns the op's tensor lists into the kernel's metadata buffer on the params'
// device: one TensorMeta per tensor, the chunk prefix sums and the gradient addresses. The buffer
// is cached, keyed by everything it contains except the gradient addresses, so a training loop
// uploads it once; the gradient addresses (which change whenever .grad is re-allocated, e.g.
// after zero_grad(set_to_none=True)) are compared on every call and re-uploaded only when they
// differ. The planner never reads a device value (steps, lr, grad_scale and found_inf are read
// by the kernel).
//
// Lifetime: a cache entry lives as long as every tensor it describes (it holds weak references to
// their storages) and is dropped after one of them is freed; there is no size bound, so a captured
// CUDA graph that reads an entry's buffer can never see it freed by other parameter sets, and any
// number of (param group x dtype) sets stay cached.
//
// CUDA graphs: while the stream is capturing, nothing goes through host memory (a captured copy
// would read the pinned staging buffer at replay, long after it was freed): uploads travel in the
// parameters of small copy kernels (Launch::uploads), which the graph keeps.
//
// Each launch gets its own zeroed completion counter, so launches on two streams, or after a
// launch that failed part-way, never share one.
#pragma once

#include <cstdint>
#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include "cuda/kernels/adam.cuh"

namespace chainrule::adam_plan {

namespace k = chainrule::kernels::adam;

// The op's arguments, as every backend receives them.
struct AdamArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params;
  AdamOptions options;
  double lr = 0.0;
  const at::Tensor* lr_tensor = nullptr;
  const std::optional<at::Tensor>* grad_scale = nullptr;
  const std::optional<at::Tensor>* found_inf = nullptr;
};

// The arguments common to both Adam entry points; the caller sets lr or lr_tensor.
inline AdamArgs make_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::TensorList state_steps, at::TensorList master_params, double beta1,
                          double beta2, double weight_decay, double eps, bool amsgrad,
                          bool maximize, bool decoupled_weight_decay,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  AdamArgs a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
             AdamOptions{beta1, beta2, eps, weight_decay, amsgrad, maximize,
                         decoupled_weight_decay}};
  a.grad_scale = &grad_scale;
  a.found_inf = &found_inf;
  return a;
}

// Defines the two Adam entry points of ops.h (float lr and tensor lr) in the enclosing namespace
// over `run_fn(const AdamArgs&)`: the CUDA launcher and its emulated twin differ only in how they
// launch.
#define CHAINRULE_DEFINE_ADAM_ENTRY_POINTS(run_fn)                                                \
  void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                \
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,                          \
             at::TensorList state_steps, at::TensorList master_params, double lr, double beta1,   \
             double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,          \
             bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,            \
             const std::optional<at::Tensor>& found_inf) {                                        \
    adam_plan::AdamArgs a = adam_plan::make_args(                                                 \
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, beta1, \
        beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,          \
        found_inf);                                                                               \
    a.lr = lr;                                                                                    \
    run_fn(a);                                                                                    \
  }                                                                                               \
  void adam_tensor_lr_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,      \
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,                \
                       at::TensorList state_steps, at::TensorList master_params,                  \
                       const at::Tensor& lr, double beta1, double beta2, double weight_decay,     \
                       double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,      \
                       const std::optional<at::Tensor>& grad_scale,                               \
                       const std::optional<at::Tensor>& found_inf) {                              \
    adam_plan::AdamArgs a = adam_plan::make_args(                                                 \
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, beta1, \
        beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,          \
        found_inf);                                                                               \
    a.lr_tensor = &lr;                                                                            \
    run_fn(a);                                                                                    \
  }

// One kernel launch: the kernel's parameters and the buffer they point into.
struct Launch {
  k::KernelParams params;
  int grid = 0;
  bool double_math = false;  // multi_tensor_adam_kernel<double> rather than <float>
  at::Tensor buffer;         // keeps the metadata alive while the launch is prepared
  at::Tensor counter;        // this launch's completion counter, zeroed in stream order
  at::Tensor lr_float;       // a bfloat16/float16 lr tensor widened to float32 on its device
  // While capturing: copies into the buffer that k::upload_bytes_kernel makes before the step
  // kernel, one launch each, in order.
  std::vector<k::ByteUpload> uploads;
};

// Counters for the tests (chainrule._C._adam_plan_stats).
struct Stats {
  std::atomic<int64_t> metadata_uploads{0};  // whole buffers written (a new cache entry)
  std::atomic<int64_t> gradient_uploads{0};  // gradient-address regions rewritten
  std::atomic<int64_t> staged_uploads{0};    // of those, copies through pinned host memory
  std::atomic<int64_t> kernel_uploads{0};    // of those, copies in kernel parameters (capture)
};
inline Stats& stats() {
  static Stats s;
  return s;
}

inline k::ParamDtype param_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::ParamDtype::float32;
    case at::kBFloat16: return k::ParamDtype::bfloat16;
    case at::kHalf: return k::ParamDtype::float16;
    case at::kDouble: return k::ParamDtype::float64;
    default:
      TORCH_CHECK(false, "chainrule.adam_: params must be float32, bfloat16, float16 or float64, got ",
                  t.scalar_type());
  }
}

inline int64_t align16(int64_t bytes) { return (bytes + 15) & ~int64_t{15}; }

// Byte offsets of the regions of one metadata buffer for n tensors.
struct Layout {
  int64_t tensors = 0, chunk_starts = 0, grads = 0, total = 0;
  explicit Layout(int64_t n) {
    tensors = 0;
    chunk_starts = align16(n * static_cast<int64_t>(sizeof(k::TensorMeta)));
    grads = chunk_starts + align16((n + 1) * static_cast<int64_t>(sizeof(int64_t)));
    total = grads + align16(n * static_cast<int64_t>(sizeof(void*)));
  }
};

struct CacheEntry {
  std::vector<uint64_t> key;  // device, then per tensor: addresses, numel, dtype
  // The storages of every tensor in the key: the entry is dropped once one of them is freed.
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  std::vector<const void*> grads;
  at::Tensor buffer;          // on the params' device
  int64_t num_chunks = 0;

  bool alive() const {
    for (const auto& storage : storages) {
      if (storage.expired()) return false;
    }
    return true;
  }
};

inline std::mutex& cache_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::list<CacheEntry>& cache() {
  static std::list<CacheEntry> entries;
  return entries;
}

// Cached parameter sets (for the tests).
inline size_t cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return cache().size();
}

inline at::Tensor host_staging(int64_t bytes, const at::Device& device) {
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(device.is_cuda()));
}

// Writes `bytes` of `source` at `offset` into the device buffer: through pinned memory and an
// asynchronous copy normally, in copy kernels' parameters while the stream is capturing.
inline void upload(Launch& launch, const at::Tensor& buffer, int64_t offset, const void* source,
                   int64_t bytes, bool capturing) {
  if (bytes == 0) return;
  if (capturing) {
    stats().kernel_uploads.fetch_add(1);
    auto* destination = static_cast<uint8_t*>(buffer.data_ptr()) + offset;
    for (int64_t done = 0; done < bytes; done += k::ByteUpload::kCapacity) {
      k::ByteUpload piece{};
      piece.destination = destination + done;
      piece.bytes = static_cast<int32_t>(std::min<int64_t>(k::ByteUpload::kCapacity, bytes - done));
      std::memcpy(piece.data, static_cast<const uint8_t*>(source) + done, piece.bytes);
      launch.uploads.push_back(piece);
    }
    return;
  }
  stats().staged_uploads.fetch_add(1);
  at::Tensor staging = host_staging(bytes, buffer.device());
  std::memcpy(staging.data_ptr(), source, bytes);
  buffer.narrow(0, offset, bytes).copy_(staging, /*non_blocking=*/true);
}

inline void add_storage(std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>>& storages,
                        const at::Tensor& t) {
  storages.push_back(t.storage().getWeakStorageImpl());
}

// Plans the launch for the tensors listed in `indices` (all of them float-math or all
// double-math). max_blocks: how many blocks the device runs at once; capturing: whether the
// current stream is capturing a CUDA graph.
inline Launch plan_subset(const AdamArgs& a, const std::vector<int64_t>& indices, bool double_math,
                          bool step_is_double, int max_blocks, bool capturing) {
  Launch launch;
  const int64_t n = static_cast<int64_t>(indices.size());
  const bool amsgrad = a.options.amsgrad;
  const bool has_master = !a.master_params.empty();
  const at::Device device = a.params[indices[0]].device();

  std::vector<uint64_t> key;
  key.reserve(1 + 8 * n);
  key.push_back((static_cast<uint64_t>(device.type()) << 32) |
                static_cast<uint64_t>(static_cast<uint32_t>(device.index())));
  std::vector<const void*> grads(n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = indices[j];
    key.push_back(reinterpret_cast<uint64_t>(a.params[i].data_ptr()));
    key.push_back(reinterpret_cast<uint64_t>(a.exp_avgs[i].data_ptr()));
    key.push_back(reinterpret_cast<uint64_t>(a.exp_avg_sqs[i].data_ptr()));
    key.push_back(amsgrad ? reinterpret_cast<uint64_t>(a.max_exp_avg_sqs[i].data_ptr()) : 0);
    key.push_back(has_master ? reinterpret_cast<uint64_t>(a.master_params[i].data_ptr()) : 0);
    key.push_back(reinterpret_cast<uint64_t>(a.state_steps[i].data_ptr()));
    key.push_back(static_cast<uint64_t>(a.params[i].numel()));
    key.push_back(static_cast<uint64_t>(param_dtype(a.params[i])));
    grads[j] = a.grads[i].data_ptr();
  }

  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  storages.reserve(6 * n);
  for (const int64_t i : indices) {
    add_storage(storages, a.params[i]);
    add_storage(storages, a.exp_avgs[i]);
    add_storage(storages, a.exp_avg_sqs[i]);
    if (amsgrad) add_storage(storages, a.max_exp_avg_sqs[i]);
    if (has_master) add_storage(storages, a.master_params[i]);
    add_storage(storages, a.state_steps[i]);
  }

  const Layout layout(n);
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& entries = cache();
  auto hit = entries.begin();
  for (; hit != entries.end(); ++hit) {
    if (hit->key == key) break;
  }
  if (hit != entries.end()) {
    entries.splice(entries.begin(), entries, hit);  // most recently used first
    CacheEntry& entry = entries.front();
    // The same addresses may now belong to new tensors (the allocator reuses memory): the entry
    // follows the tensors it is used for.
    entry.storages = std::move(storages);
    if (std::memcmp(entry.grads.data(), grads.data(), n * sizeof(void*)) != 0) {
      stats().gradient_uploads.fetch_add(1);
      upload(launch, entry.buffer, layout.grads, grads.data(),
             n * static_cast<int64_t>(sizeof(void*)), capturing);
      entry.grads = grads;
    }
  } else {
    // Entries of freed tensors go; their addresses cannot be stepped again.
    entries.remove_if([](const CacheEntry& e) { return !e.alive(); });
    stats().metadata_uploads.fetch_add(1);
    std::vector<uint8_t> staging(layout.total, 0);
    auto* base = staging.data();
    auto* metas = reinterpret_cast<k::TensorMeta*>(base + layout.tensors);
    auto* chunk_starts = reinterpret_cast<int64_t*>(base + layout.chunk_starts);
    int64_t chunks = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = indices[j];
      k::TensorMeta& m = metas[j];
      m.param = a.params[i].data_ptr();
      m.exp_avg = a.exp_avgs[i].data_ptr();
      m.exp_avg_sq = a.exp_avg_sqs[i].data_ptr();
      m.max_exp_avg_sq = amsgrad ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
      m.master = has_master ? a.master_params[i].data_ptr<float>() : nullptr;
      m.step = a.state_steps[i].data_ptr();
      m.numel = a.params[i].numel();
      m.dtype = static_cast<int32_t>(param_dtype(a.params[i]));
      chunk_starts[j] = chunks;
      chunks += (m.numel + k::kChunk - 1) / k::kChunk;
    }
    chunk_starts[n] = chunks;
    std::memcpy(base + layout.grads, grads.data(), n * sizeof(void*));
    CacheEntry entry;
    entry.key = std::move(key);
    entry.storages = std::move(storages);
    entry.grads = std::move(grads);
    entry.num_chunks = chunks;
    entry.buffer = at::empty({layout.total}, at::TensorOptions().dtype(at::kByte).device(device));
    upload(launch, entry.buffer, 0, base, layout.total, capturing);
    entries.push_front(std::move(entry));
  }
  const CacheEntry& entry = entries.front();

  launch.buffer = entry.buffer;
  launch.counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  launch.double_math = double_math;
  auto* base = static_cast<uint8_t*>(entry.buffer.data_ptr());
  k::KernelParams& p = launch.params;
  p.tensors = reinterpret_cast<const k::TensorMeta*>(base + layout.tensors);
  p.chunk_starts = reinterpret_cast<const int64_t*>(base + layout.chunk_starts);
  p.grads = reinterpret_cast<const void* const*>(base + layout.grads);
  p.blocks_done = static_cast<unsigned int*>(launch.counter.data_ptr());
  p.num_tensors = static_cast<int32_t>(n);
  p.num_chunks = entry.num_chunks;
  p.options = a.options;
  p.lr = a.lr;
  p.lr_tensor = nullptr;
  p.lr_is_double = false;
  if (a.lr_tensor != nullptr) {
    const at::ScalarType lr_dtype = a.lr_tensor->scalar_type();
    if (lr_dtype == at::kFloat || lr_dtype == at::kDouble) {
      p.lr_tensor = a.lr_tensor->data_ptr();
      p.lr_is_double = lr_dtype == at::kDouble;
    } else {
      // The kernel reads float32 or float64; a 16-bit lr is widened (exactly) on the device, in
      // stream order, without a host read.
      launch.lr_float = a.lr_tensor->to(at::kFloat);
      p.lr_tensor = launch.lr_float.data_ptr();
    }
  }
  p.step_is_double = step_is_double;
  p.grad_scale = a.grad_scale != nullptr && a.grad_scale->has_value()
                     ? (*a.grad_scale)->data_ptr<float>() : nullptr;
  p.found_inf = a.found_inf != nullptr && a.found_inf->has_value()
                    ? (*a.found_inf)->data_ptr<float>() : nullptr;
  // At least one block, so that the step counts advance even when every tensor is empty.
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(entry.num_chunks, 1), max_blocks);
  launch.grid = static_cast<int>(std::max<int64_t>(blocks, 1));
  return launch;
}

// The launches for one op call: at most two (float math for float32/bfloat16/float16 params,
// double math for float64 params), none when there is nothing to update.
inline std::vector<Launch> plan(const AdamArgs& a, int max_blocks, bool capturing) {
  const int64_t n = static_cast<int64_t>(a.params.size());
  std::vector<Launch> launches;
  if (n == 0) return launches;
  TORCH_CHECK(n < (int64_t{1} << 31), "chainrule.adam_: too many tensors (", n, ")");
  std::vector<int64_t> float_indices, double_indices;
  const at::ScalarType step_dtype = a.state_steps[0].scalar_type();
  TORCH_CHECK(step_dtype == at::kFloat || step_dtype == at::kDouble,
              "chainrule.adam_: state_steps must be float32 or float64, got ", step_dtype);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& param = a.params[i];
    TORCH_CHECK(a.state_steps[i].scalar_type() == step_dtype,
                "chainrule.adam_: state_steps must all have one dtype, got ", step_dtype, " and ",
                a.state_steps[i].scalar_type(), " (index ", i, ")");
    TORCH_CHECK(param.is_contiguous() && a.grads[i].is_contiguous() &&
                    a.exp_avgs[i].is_contiguous() && a.exp_avg_sqs[i].is_contiguous() &&
                    (!a.options.amsgrad || a.max_exp_avg_sqs[i].is_contiguous()) &&
                    (a.master_params.empty() || a.master_params[i].is_contiguous()),
                "chainrule.adam_: params, grads and states must be contiguous (index ", i, ")");
    (param.scalar_type() == at::kDouble ? double_indices : float_indices).push_back(i);
  }
  if (!float_indices.empty()) {
    launches.push_back(plan_subset(a, float_indices, false, step_dtype == at::kDouble, max_blocks,
                                   capturing));
  }
  if (!double_indices.empty()) {
    launches.push_back(plan_subset(a, double_indices, true, step_dtype == at::kDouble, max_blocks,
                                   capturing));
  }
  return launches;
}

}  // namespace chainrule::adam_plan
