// Quantised weights on the CPU (engine/quantization.py builds and calls these), in GGUF's formats.
// q8_matmul: the int8 LM head, Q8_0 (per 32 inputs an fp16 scale, w = scale * q, |q| <= 127); each
// activation row is quantised to int8 per 32 inputs first, so a block's dot product is integer
// multiply-adds (maddubs), as llama.cpp does. q4_dequantize: Q4_1 blocks (per 32 inputs an fp16 scale
// and minimum, w = scale * q + min) back to fp32, for prefill chunks, whose many rows multiply faster
// in fp32 than through any int4 kernel. Built with -mavx2 -mfma -mf16c.
//
// Shapes (C order): x [M, K] float32, out [M, N] float32, weights [N, K] int8, scales [N, K / 32]
// fp16; Q4_1: packed [N, K / 2] uint8 (byte j of a block holds input j in its low nibble and input
// j + 16 in its high one), scales and mins [N, K / 32] fp16, weight [N, K] float32. K is a multiple
// of 32.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../attention/simd.h"

namespace {

constexpr int kGroup = 32;

struct Activations {
  std::vector<int8_t> q;    // [M, K]
  std::vector<float> d;     // [M, K / 32] scale of each block
};

thread_local Activations scratch;  // reused across calls: a decode step makes hundreds

using simd::hsum;

inline float half(uint16_t h) { return _cvtsh_ss(h); }

const Activations& quantize(const float* x, int64_t m, int64_t k) {
  const int64_t groups = k / kGroup;
  Activations& a = scratch;
  a.q.resize(m * k), a.d.resize(m * groups);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < m * groups; ++i) {
    const float* src = x + i * kGroup;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(src + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    a.d[i] = d;
    const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_ROUND_NEAREST));
    // pack 32 int32 -> 32 int8 in order (packs interleave 128-bit lanes: permute back)
    __m256i lo = _mm256_packs_epi32(q[0], q[1]), hi = _mm256_packs_epi32(q[2], q[3]);
    __m256i bytes = _mm256_packs_epi16(lo, hi);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + i * kGroup), bytes);
  }
  return a;
}

// 32 int8 products of unsigned weights (|w|) and signed activations, summed to 8 int32 -> float.
inline __m256 dot_block(__m256i w_unsigned, __m256i x_signed) {
  const __m256i pairs = _mm256_maddubs_epi16(w_unsigned, x_signed);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

template <int R>
void q8_rows(const Activations& a, int64_t r0, int64_t k, const int8_t* w, const uint16_t* scales,
             int64_t n0, int64_t n1, int64_t n, float* out) {
  const int64_t groups = k / kGroup;
  for (int64_t j = n0; j < n1; ++j) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k + g * kGroup));
      const __m256i magnitude = _mm256_sign_epi8(wq, wq);
      const float s = half(scales[j * groups + g]);
      for (int r = 0; r < R; ++r) {
        const int64_t row = (r0 + r) * groups + g;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * kGroup));
        acc[r] = _mm256_fmadd_ps(dot_block(magnitude, _mm256_sign_epi8(xq, wq)),
                                 _mm256_set1_ps(s * a.d[row]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[(r0 + r) * n + j] = hsum(acc[r]);
  }
}

// Rows of activations in tiles of 8, 4, 2 and 1 (the rows of a tile share each loaded weight block);
// output columns split across threads.
template <typename Tile>
void run(int64_t m, int64_t n, int threads, Tile tile) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, n / 16));
  const int64_t chunk = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(chunks) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(n, n0 + chunk);
    int64_t r = 0;
    for (; r + 8 <= m; r += 8) tile(std::integral_constant<int, 8>{}, r, n0, n1);
    for (; r + 4 <= m; r += 4) tile(std::integral_constant<int, 4>{}, r, n0, n1);
    for (; r + 2 <= m; r += 2) tile(std::integral_constant<int, 2>{}, r, n0, n1);
    for (; r < m; ++r) tile(std::integral_constant<int, 1>{}, r, n0, n1);
  }
}

}  // namespace

extern "C" void q4_dequantize(const uint8_t* packed, const uint16_t* scales, const uint16_t* mins,
                              int64_t n, int64_t k, float* weight, int threads) {
  const int64_t groups = k / kGroup;
  const __m128i low = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (j * groups + g) * 16));
      const __m128i halves[2] = {_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low)};
      const __m256 s = _mm256_set1_ps(half(scales[j * groups + g]));
      const __m256 mn = _mm256_set1_ps(half(mins[j * groups + g]));
      float* dst = weight + j * k + g * kGroup;
      for (int h = 0; h < 2; ++h) {
        for (int e = 0; e < 2; ++e) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8 * e)));
          _mm256_storeu_ps(dst + 16 * h + 8 * e, _mm256_fmadd_ps(q, s, mn));
        }
      }
    }
  }
}

extern "C" void q8_matmul(const float* x, int64_t m, int64_t k, const int8_t* w, const uint16_t* scales,
                          int64_t n, float* out, int threads) {
  const Activations& a = quantize(x, m, k);
  run(m, n, threads, [&](auto rows, int64_t r, int64_t n0, int64_t n1) {
    q8_rows<decltype(rows)::value>(a, r, k, w, scales, n0, n1, n, out);
  });
}
