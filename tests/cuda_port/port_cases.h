// The cases of the port check (tests/cuda_port/port_check.cu): the inputs each kernel of
// port_kernels.cuh gets, what the PTX ISA says it must return (the reference the emulator's result
// is checked against), and how a GPU's result is compared with the emulator's. Host code only.
//
// Reference layouts (PTX ISA, "ldmatrix" and "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8";
// g = lane / 4, t = lane % 4):
//   ldmatrix .m8n8 .b16: register j of lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix
//     j (low half first); .trans delivers the transpose.
//   m16n8k16: A element i at (g + 8((i/2)%2), 2t + i%2 + 8(i/4)), B element i at
//     (2t + i%2 + 8(i/2), g); m16n8k8: A element i at (g + 8(i/2), 2t + i%2), B element i at
//     (2t + i, g); C and D element i at (g + 8(i/2), 2t + i%2). Two 16-bit elements per register,
//     the lower-numbered one in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace port_check {

enum class Kind { ldmatrix, mma, cp_async };

// The inputs of an mma case: "exact" values (multiples of 1/8 up to 4 in magnitude, C multiples of
// 1/64) make every partial sum exact in fp32, so any correct accumulation order gives the same
// bits and the GPU must equal the emulator bit for bit; "random" (normal) values show the tensor
// cores' own rounding, which the PTX ISA leaves open, and are held to an error bound instead.
enum class Values { exact, random };

struct PortCase {
  std::string name;
  int kernel;  // index into kPortKernels (port_kernels.cuh)
  Kind kind;
  int count = 0;         // ldmatrix: 1, 2, 4
  bool trans = false;    // ldmatrix .trans
  bool k16 = false;      // mma m16n8k16 (else m16n8k8)
  bool bf16 = false;     // mma bf16 (else f16)
  Values values = Values::exact;
  int bytes = 0;         // cp.async size
  int wait_groups = 0;   // cp.async.wait_group N
  uint32_t seed = 0;
  size_t in_words = 0, out_words = 0;
};

constexpr int kLdRowStride = 24;  // = kLdmatrixRowStride
constexpr int kCopyGroupsHost = 4;
constexpr uint32_t kUntouched = 0x5eed5eedu;  // out's initial words: left alone where nothing lands

inline std::vector<PortCase> port_cases() {
  std::vector<PortCase> cases;
  const int counts[] = {1, 2, 4};
  for (int trans = 0; trans < 2; ++trans)
    for (int c = 0; c < 3; ++c) {
      PortCase p{};
      p.name = "ldmatrix_x" + std::to_string(counts[c]) + (trans ? "_trans" : "");
      p.kernel = 3 * trans + c;
      p.kind = Kind::ldmatrix;
      p.count = counts[c];
      p.trans = trans;
      p.seed = 100 + p.kernel;
      p.in_words = 4 * 8 * kLdRowStride / 2;
      p.out_words = 128;
      cases.push_back(p);
    }
  // kernels 6..9: m16n8k16 bf16, m16n8k16 f16, m16n8k8 bf16, m16n8k8 f16
  for (int k = 0; k < 4; ++k)
    for (Values values : {Values::exact, Values::random})
      for (uint32_t seed = 0; seed < 3; ++seed) {
        PortCase p{};
        p.k16 = k < 2;
        p.bf16 = k % 2 == 0;
        p.values = values;
        p.name = std::string(p.k16 ? "mma_m16n8k16" : "mma_m16n8k8") + (p.bf16 ? "_bf16" : "_f16") +
                 (values == Values::exact ? "_exact_" : "_random_") + std::to_string(seed);
        p.kernel = 6 + k;
        p.kind = Kind::mma;
        p.seed = 1000 * (k + 1) + (values == Values::exact ? 0 : 500) + seed;
        p.in_words = 32 * 10;
        p.out_words = 128;
        cases.push_back(p);
      }
  // kernels 10..21: cp.async 4, 8, 16 bytes x wait_group 0..3
  const int sizes[] = {4, 8, 16};
  for (int s = 0; s < 3; ++s)
    for (int wait = 0; wait < 4; ++wait) {
      PortCase p{};
      p.name = "cp_async_" + std::to_string(sizes[s]) + "B_wait_group_" + std::to_string(wait);
      p.kernel = 10 + 4 * s + wait;
      p.kind = Kind::cp_async;
      p.bytes = sizes[s];
      p.wait_groups = wait;
      p.seed = 5000 + p.kernel;
      p.in_words = kCopyGroupsHost * 32 * sizes[s] / 4;
      p.out_words = p.in_words;
      cases.push_back(p);
    }
  return cases;
}

// ---- 16-bit values -----------------------------------------------------------------------------
inline float word_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t float_word(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}
inline uint16_t to_b16(float value, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw = __nv_bfloat16(__float2bfloat16_rn(value));
    return raw.x;
  }
  __half_raw raw = __half(__float2half_rn(value));
  return raw.x;
}
inline double from_b16(uint16_t bits, bool bf16) {
  if (bf16) return word_float(static_cast<uint32_t>(bits) << 16);
  __half_raw raw;
  raw.x = bits;
  return static_cast<double>(__half2float(__half(raw)));
}

// ---- mma fragments -----------------------------------------------------------------------------
struct MmaMatrices {
  double a[16][16] = {}, b[16][8] = {}, c[16][8] = {};
};
inline void a_position(bool k16, int lane, int i, int& row, int& col) {
  const int g = lane / 4, t = lane % 4;
  if (k16) { row = g + 8 * ((i / 2) % 2); col = 2 * t + i % 2 + 8 * (i / 4); }
  else { row = g + 8 * (i / 2); col = 2 * t + i % 2; }
}
inline void b_position(bool k16, int lane, int i, int& row, int& col) {
  const int g = lane / 4, t = lane % 4;
  if (k16) { row = 2 * t + i % 2 + 8 * (i / 2); col = g; }
  else { row = 2 * t + i; col = g; }
}
inline void cd_position(int lane, int i, int& row, int& col) {
  const int g = lane / 4, t = lane % 4;
  row = g + 8 * (i / 2);
  col = 2 * t + i % 2;
}

// The matrices an mma case's input encodes (read back through the ISA's fragment layout).
inline MmaMatrices unpack_mma(const PortCase& p, const std::vector<uint32_t>& in) {
  MmaMatrices m;
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* words = in.data() + 10 * lane;
    for (int i = 0; i < (p.k16 ? 8 : 4); ++i) {
      int row, col;
      a_position(p.k16, lane, i, row, col);
      m.a[row][col] = from_b16(static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2))), p.bf16);
    }
    for (int i = 0; i < (p.k16 ? 4 : 2); ++i) {
      int row, col;
      b_position(p.k16, lane, i, row, col);
      m.b[row][col] = from_b16(static_cast<uint16_t>(words[4 + i / 2] >> (16 * (i % 2))), p.bf16);
    }
    for (int i = 0; i < 4; ++i) {
      int row, col;
      cd_position(lane, i, row, col);
      m.c[row][col] = word_float(words[6 + i]);
    }
  }
  return m;
}

// ---- inputs --------------------------------------------------------------------------------------
inline std::vector<uint32_t> make_input(const PortCase& p) {
  std::mt19937 rng(p.seed);
  std::vector<uint32_t> in(p.in_words, 0);
  if (p.kind == Kind::ldmatrix || p.kind == Kind::cp_async) {
    for (auto& w : in) w = static_cast<uint32_t>(rng());
    return in;
  }
  std::uniform_int_distribution<int> eighths(-32, 32), sixtyfourths(-4096, 4096);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto element = [&]() -> uint16_t {
    const float v = p.values == Values::exact ? eighths(rng) / 8.0f : normal(rng);
    return to_b16(v, p.bf16);
  };
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* words = in.data() + 10 * lane;
    for (int r = 0; r < (p.k16 ? 4 : 2); ++r) words[r] = element() | (static_cast<uint32_t>(element()) << 16);
    for (int r = 0; r < (p.k16 ? 2 : 1); ++r) words[4 + r] = element() | (static_cast<uint32_t>(element()) << 16);
    for (int i = 0; i < 4; ++i)
      words[6 + i] = float_word(p.values == Values::exact ? sixtyfourths(rng) / 64.0f : 4.0f * normal(rng));
  }
  return in;
}

inline std::vector<uint32_t> initial_output(const PortCase& p) { return std::vector<uint32_t>(p.out_words, kUntouched); }

// ---- what the ISA says -------------------------------------------------------------------------
// The expected output, and for mma the bound each element may differ from the exact result by
// (0 for exact values).
struct Expected {
  std::vector<uint32_t> words;
  std::vector<double> exact;  // mma: the exact D
  std::vector<double> bound;  // mma: allowed |D - exact| per element
};

inline Expected expected_output(const PortCase& p, const std::vector<uint32_t>& in) {
  Expected e;
  e.words = initial_output(p);
  if (p.kind == Kind::ldmatrix) {
    const auto* smem = reinterpret_cast<const uint16_t*>(in.data());
    auto value = [&](int j, int row, int col) {
      return static_cast<uint32_t>(smem[(j * 8 + (row * 5 + j * 3) % 8) * kLdRowStride + col]);
    };
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j) {
        uint32_t word = 0;
        if (j < p.count) {
          if (!p.trans) word = value(j, lane / 4, 2 * (lane % 4)) | (value(j, lane / 4, 2 * (lane % 4) + 1) << 16);
          else word = value(j, 2 * (lane % 4), lane / 4) | (value(j, 2 * (lane % 4) + 1, lane / 4) << 16);
        }
        e.words[4 * lane + j] = word;
      }
  } else if (p.kind == Kind::mma) {
    const MmaMatrices m = unpack_mma(p, in);
    const int k_dim = p.k16 ? 16 : 8;
    e.exact.resize(128);
    e.bound.resize(128);
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        int row, col;
        cd_position(lane, i, row, col);
        double sum = m.c[row][col], magnitude = std::fabs(m.c[row][col]);
        for (int k = 0; k < k_dim; ++k) {
          sum += m.a[row][k] * m.b[k][col];
          magnitude += std::fabs(m.a[row][k] * m.b[k][col]);
        }
        e.exact[4 * lane + i] = sum;
        e.words[4 * lane + i] = float_word(static_cast<float>(sum));
        // fp32 accumulation of k_dim + 1 terms in any order, with truncation allowed: a few ulps
        // of the largest partial sum (Higham's bound, 2 u per addition).
        e.bound[4 * lane + i] = p.values == Values::exact ? 0.0 : 2.0 * (k_dim + 1) * std::ldexp(1.0, -23) * magnitude;
      }
  } else {
    const auto* source = reinterpret_cast<const unsigned char*>(in.data());
    auto* out = reinterpret_cast<unsigned char*>(e.words.data());
    for (int g = 0; g < kCopyGroupsHost - p.wait_groups; ++g)
      for (int lane = 0; lane < 32; ++lane) {
        const int slot = 32 * g + lane, src_bytes = (lane + g) % (p.bytes + 1);
        for (int b = 0; b < p.bytes; ++b) out[slot * p.bytes + b] = b < src_bytes ? source[slot * p.bytes + b] : 0;
      }
  }
  return e;
}

// ---- comparisons -------------------------------------------------------------------------------
// "" when `got` is what `want` says; else the first differences, one per line (at most 4).
inline std::string describe_mismatch(const char* what, const std::vector<uint32_t>& got,
                                     const std::vector<uint32_t>& want, size_t* count = nullptr) {
  std::string text;
  size_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    if (++differ <= 4) {
      char line[160];
      std::snprintf(line, sizeof line, "%sword %zu: %s 0x%08x, expected 0x%08x", text.empty() ? "" : "; ", i,
                    what, got[i], want[i]);
      text += line;
    }
  }
  if (count) *count = differ;
  if (differ > 4) text += "; " + std::to_string(differ - 4) + " more";
  return text;
}

// The emulator's result against the ISA: bit for bit, except random-valued mma (within the bound:
// the emulator sums exactly and rounds once, the ISA allows any order).
inline std::string check_against_reference(const PortCase& p, const std::vector<uint32_t>& in,
                                           const std::vector<uint32_t>& got) {
  const Expected e = expected_output(p, in);
  if (p.kind != Kind::mma || p.values == Values::exact) return describe_mismatch("emulator", got, e.words);
  for (size_t i = 0; i < got.size(); ++i)
    if (std::fabs(word_float(got[i]) - e.exact[i]) > e.bound[i]) {
      char line[160];
      std::snprintf(line, sizeof line, "element %zu: emulator %.9g, exact %.17g, bound %.3g", i, word_float(got[i]),
                    e.exact[i], e.bound[i]);
      return line;
    }
  return "";
}

// The GPU's result against the emulator's. Returns "" on a pass; `detail` says how close.
// Bit for bit for every case but random-valued mma, where both must be within the bound of the
// exact result and the number of differing words is reported.
inline std::string compare_gpu_with_emulator(const PortCase& p, const std::vector<uint32_t>& in,
                                             const std::vector<uint32_t>& gpu, const std::vector<uint32_t>& emulated,
                                             std::string& detail) {
  size_t differ = 0;
  const std::string bitwise = describe_mismatch("gpu", gpu, emulated, &differ);
  if (p.kind != Kind::mma || p.values == Values::exact) {
    detail = "bit for bit, " + std::to_string(gpu.size()) + " words";
    return bitwise;
  }
  const Expected e = expected_output(p, in);
  double worst = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const double error = std::fabs(word_float(gpu[i]) - e.exact[i]);
    if (error > e.bound[i]) {
      char line[200];
      std::snprintf(line, sizeof line, "element %zu: gpu %.9g, emulator %.9g, exact %.17g, bound %.3g", i,
                    word_float(gpu[i]), word_float(emulated[i]), e.exact[i], e.bound[i]);
      return line;
    }
    if (e.bound[i] > 0) worst = std::fmax(worst, error / e.bound[i]);
  }
  char line[160];
  std::snprintf(line, sizeof line, "%zu of %zu words differ from the emulator (tensor-core rounding); worst error %.2f of the bound",
                differ, gpu.size(), worst);
  detail = line;
  return "";
}

}  // namespace port_check
