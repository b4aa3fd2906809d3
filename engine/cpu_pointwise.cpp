// The elementwise work between a CPU step's matmuls (engine/cpu_pointwise.py builds and calls these):
// RMSNorm with the residual add before it, RoPE, SiLU(gate) * up. Each is one call where torch runs
// five to twelve small ops, whose dispatch, not their arithmetic, is what a decode step of a small
// model spends its time on. Arithmetic is float32 in the order torch's reference functions use
// (engine/models/layers.py); built with -ffp-contract=off so no multiply-add is fused behind our back.
//
// Activations are float32; rows of a [rows, ...] tensor lie `stride` elements apart, the elements of a
// row contiguous.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "../attention/simd.h"

namespace {

bool parallel(int64_t rows, int64_t width) { return rows > 1 && rows * width >= (1 << 16); }

}  // namespace

// out = norm(x (+ residual)) * weight, per row of `dim`; with a residual, its sum with x goes to `sum`
// (float32: the residual stream). Llama scales by w after the normalised row (w * (x / rms)); Gemma
// (unit_offset) by (1 + w).
extern "C" void rms_norm(const float* x, int64_t x_stride, const float* residual, const float* weight,
                         int64_t rows, int64_t dim, float eps, int unit_offset, float* sum, float* out,
                         int threads) {
#pragma omp parallel for num_threads(threads) if (parallel(rows, dim)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r * x_stride;
    float* s = residual ? sum + r * dim : nullptr;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
      __m256 v = _mm256_loadu_ps(x + row + i);
      if (s) {
        v = _mm256_add_ps(v, _mm256_loadu_ps(residual + r * dim + i));
        _mm256_storeu_ps(s + i, v);
      }
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float squares = simd::hsum(acc);
    for (; i < dim; ++i) {
      float v = x[row + i] + (s ? residual[r * dim + i] : 0.0f);
      if (s) s[i] = v;
      squares += v * v;
    }
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) {
      const float normed = (s ? s[i] : x[row + i]) * inv;
      out[r * dim + i] = unit_offset ? normed * (1.0f + weight[i]) : weight[i] * normed;
    }
  }
}

// Rotary embedding of q [rows, hq, d] and k [rows, hk, d] (heads contiguous within a row) into
// contiguous float32 outputs: x * cos + rotate_half(x) * sin, cos and sin [rows, d] float32.
extern "C" void rope(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t rows,
                     int64_t hq, int64_t hk, int64_t d, const float* cos, const float* sin, float* q_out,
                     float* k_out, int threads) {
  const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) if (parallel(rows, (hq + hk) * d)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * d;
    const float* sn = sin + r * d;
    for (int64_t h = 0; h < hq + hk; ++h) {
      const bool is_q = h < hq;
      const float* src = (is_q ? q : k) + (is_q ? r * q_stride : r * k_stride) + (is_q ? h : h - hq) * d;
      float* dst = is_q ? q_out + (r * hq + h) * d : k_out + (r * hk + h - hq) * d;
      for (int64_t i = 0; i < d; ++i) {
        const float rotated = i < half ? -src[i + half] : src[i - half];
        dst[i] = src[i] * c[i] + rotated * sn[i];
      }
    }
  }
}

// out [rows, size] = silu(gate) * up, gate and up the two halves of each gate_up row.
extern "C" void silu_mul(const float* gate_up, int64_t stride, int64_t rows, int64_t size, float* out,
                         int threads) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for num_threads(threads) if (parallel(rows, size)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r * stride, u = g + size;
    int64_t i = 0;
    for (; i + 8 <= size; i += 8) {
      const __m256 x = _mm256_loadu_ps(gate_up + g + i);
      const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, simd::exp8(_mm256_xor_ps(x, sign))));
      _mm256_storeu_ps(out + r * size + i, _mm256_mul_ps(silu, _mm256_loadu_ps(gate_up + u + i)));
    }
    for (; i < size; ++i) {
      const float x = gate_up[g + i];
      out[r * size + i] = x / (1.0f + std::exp(-x)) * gate_up[u + i];
    }
  }
}
