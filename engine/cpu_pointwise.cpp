// The elementwise work between a CPU step's matmuls (engine/cpu_pointwise.py builds and calls these):
// RMSNorm with the residual add before it, RoPE, SiLU(gate) * up. Each is one call where torch runs
// five to twelve small ops, whose dispatch, not their arithmetic, is what a decode step of a small
// model spends its time on. Arithmetic is float32 in the order torch's reference functions use
// (engine/models/layers.py); built with -ffp-contract=off so no multiply-add is fused behind our back.
//
// Activations are float32 or bfloat16 (`bf16` flags); rows of a [rows, ...] tensor lie `stride`
// elements apart, the elements of a row contiguous.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../attention/simd.h"

namespace {

inline float load1(const void* p, int64_t i, int bf16) {
  if (!bf16) return static_cast<const float*>(p)[i];
  uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> bfloat16 rounding to nearest even, NaN kept quiet (as torch's cast does).
inline void store1(void* p, int64_t i, float f, int bf16) {
  if (!bf16) {
    static_cast<float*>(p)[i] = f;
    return;
  }
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  static_cast<uint16_t*>(p)[i] = std::isnan(f) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline __m256 load8(const void* p, int64_t i, int bf16) {
  if (!bf16) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline void store8(void* p, int64_t i, __m256 v, int bf16) {
  if (!bf16) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    return;
  }
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int j = 0; j < 8; ++j) store1(p, i + j, f[j], 1);
}

bool parallel(int64_t rows, int64_t width) { return rows > 1 && rows * width >= (1 << 16); }

}  // namespace

// out = norm(x (+ residual)) * weight, per row of `dim`; with a residual, its sum with x goes to `sum`
// (float32: the residual stream). Llama scales by w after the normalised row (w * (x / rms)); Gemma
// (unit_offset) by (1 + w).
extern "C" void rms_norm(const void* x, int64_t x_stride, int x_bf16, const void* residual, int residual_bf16,
                         const float* weight, int64_t rows, int64_t dim, float eps, int unit_offset,
                         float* sum, void* out, int out_bf16, int threads) {
#pragma omp parallel for num_threads(threads) if (parallel(rows, dim)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r * x_stride;
    float* s = residual ? sum + r * dim : nullptr;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      __m256 v = load8(x, row + i, x_bf16);
      if (s) {
        v = _mm256_add_ps(v, load8(residual, r * dim + i, residual_bf16));
        _mm256_storeu_ps(s + i, v);
      }
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float squares = simd::hsum(acc);
    for (; i < dim; ++i) {
      float v = load1(x, row + i, x_bf16) + (s ? load1(residual, r * dim + i, residual_bf16) : 0.0f);
      if (s) s[i] = v;
      squares += v * v;
    }
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) {
      const float normed = (s ? s[i] : load1(x, row + i, x_bf16)) * inv;
      store1(out, r * dim + i, unit_offset ? normed * (1.0f + weight[i]) : weight[i] * normed, out_bf16);
    }
  }
}

// Rotary embedding of q [rows, hq, d] and k [rows, hk, d] (heads contiguous within a row) into
// contiguous float32 outputs: x * cos + rotate_half(x) * sin, cos and sin [rows, d] float32.
extern "C" void rope(const void* q, int64_t q_stride, const void* k, int64_t k_stride, int bf16, int64_t rows,
                     int64_t hq, int64_t hk, int64_t d, const float* cos, const float* sin, float* q_out,
                     float* k_out, int threads) {
  const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) if (parallel(rows, (hq + hk) * d)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * d;
    const float* sn = sin + r * d;
    for (int64_t h = 0; h < hq + hk; ++h) {
      const bool is_q = h < hq;
      const void* src = is_q ? q : k;
      const int64_t base = (is_q ? r * q_stride : r * k_stride) + (is_q ? h : h - hq) * d;
      float* dst = is_q ? q_out + (r * hq + h) * d : k_out + (r * hk + h - hq) * d;
      for (int64_t i = 0; i < d; ++i) {
        const float x = load1(src, base + i, bf16);
        const float rotated = i < half ? -load1(src, base + i + half, bf16) : load1(src, base + i - half, bf16);
        dst[i] = x * c[i] + rotated * sn[i];
      }
    }
  }
}

// out [rows, size] = silu(gate) * up, gate and up the two halves of each gate_up row.
extern "C" void silu_mul(const void* gate_up, int64_t stride, int in_bf16, int64_t rows, int64_t size,
                         void* out, int out_bf16, int threads) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for num_threads(threads) if (parallel(rows, size)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r * stride, u = g + size;
    int64_t i = 0;
    for (; i + 8 <= size; i += 8) {
      const __m256 x = load8(gate_up, g + i, in_bf16);
      const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, simd::exp8(_mm256_xor_ps(x, sign))));
      store8(out, r * size + i, _mm256_mul_ps(silu, load8(gate_up, u + i, in_bf16)), out_bf16);
    }
    for (; i < size; ++i) {
      const float x = load1(gate_up, g + i, in_bf16);
      store1(out, r * size + i, x / (1.0f + std::exp(-x)) * load1(gate_up, u + i, in_bf16), out_bf16);
    }
  }
}
