// Quantised weights on the CPU (engine/quantization.py builds and calls these), in GGUF's formats, with
// each activation row quantised to int8 per 32 inputs first (scale d = max |x| / 127), so a block's dot
// product is integer multiply-adds (maddubs), as llama.cpp does. Built with -mavx2 -mfma -mf16c.
//
// q4_matmul: Q4_1 weights (per 32 inputs an fp16 scale s and minimum m, w = s * q + m, q in 0..15) in
// tiles of 8 output columns: per tile and block 4 x 32 bytes, byte 4 * c + i of register p holding input
// 4 * p + i (low nibble) and 4 * (p + 4) + i (high nibble) of the tile's column c, so one maddubs
// multiplies 4 inputs of a row with 4 weights of each of 8 columns and the 8 sums come out in one
// register, with no horizontal add. A block's dot product is s * d * sum(q * xq) + m * d * sum(xq).
// q4_dequantize: the same tiles back to fp32, for prefill chunks, whose many rows multiply faster in fp32.
// q8_matmul: the int8 LM head, Q8_0 (per 32 inputs an fp16 scale, w = scale * q, |q| <= 127), rows [N, K].
//
// Shapes (C order): x [M, K] float32, out [M, N] float32; Q4_1 tiles: packed [N / 8, K / 32, 128] uint8,
// scales and mins [N / 8, K / 32, 8] fp16, weight [N, K] float32; Q8_0: weights [N, K] int8, scales
// [N, K / 32] fp16. K is a multiple of 32, a Q4_1 N of 8.
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
  std::vector<float> sum;   // [M, K / 32] d * the sum of the block's int8 values
};

thread_local Activations scratch;  // reused across calls: a decode step makes hundreds

inline float half(uint16_t h) { return _cvtsh_ss(h); }

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

const Activations& quantize(const float* x, int64_t m, int64_t k) {
  const int64_t groups = k / kGroup;
  Activations& a = scratch;
  a.q.resize(m * k), a.d.resize(m * groups), a.sum.resize(m * groups);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < m * groups; ++i) {
    const float* src = x + i * kGroup;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(src + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    const float d = simd::hmax(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_ROUND_NEAREST));
    // pack 32 int32 -> 32 int8 in order (packs interleave 128-bit lanes: permute back)
    __m256i lo = _mm256_packs_epi32(q[0], q[1]), hi = _mm256_packs_epi32(q[2], q[3]);
    __m256i bytes = _mm256_packs_epi16(lo, hi);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + i * kGroup), bytes);
    a.d[i] = d;
    a.sum[i] = d * static_cast<float>(hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                                _mm256_add_epi32(q[2], q[3]))));
  }
  return a;
}

// Rows r0 .. r0 + R of one tile of 8 columns. The 8 maddubs of a block stay in int16: each product pair
// is at most 2 * 15 * 127 and 8 of them (30,480) fit.
template <int R>
void q4_tile(const Activations& a, int64_t r0, int64_t groups, const uint8_t* packed, const uint16_t* scales,
             const uint16_t* mins, int64_t t, int64_t n, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t block = t * groups + g;
    __m256i w[8];
    for (int p = 0; p < 4; ++p) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + block * 128 + 32 * p));
      w[p] = _mm256_and_si256(b, low);
      w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + block * 8)));
    const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + block * 8)));
    for (int r = 0; r < R; ++r) {
      const int64_t row = (r0 + r) * groups + g;
      const int32_t* xq = reinterpret_cast<const int32_t*>(a.q.data() + row * kGroup);
      __m256i pairs = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xq[0]));
      for (int c = 1; c < 8; ++c)
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(xq[c])));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(a.d[row])), acc[r]);
      acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.sum[row]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + (r0 + r) * n + 8 * t, acc[r]);
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
    for (int r = 0; r < R; ++r) out[(r0 + r) * n + j] = simd::hsum(acc[r]);
  }
}

// Rows in tiles of `Max`, then 4, 2 and 1 (the rows of a tile share each loaded weight block); output
// columns (or tiles of them) split across threads.
template <int Max, typename Tile>
void run(int64_t m, int64_t columns, int threads, Tile tile) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, columns / 8));
  const int64_t chunk = (columns + chunks - 1) / chunks;
#pragma omp parallel for num_threads(chunks) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(columns, n0 + chunk);
    int64_t r = 0;
    for (; r + Max <= m; r += Max) tile(std::integral_constant<int, Max>{}, r, n0, n1);
    if constexpr (Max > 4)
      for (; r + 4 <= m; r += 4) tile(std::integral_constant<int, 4>{}, r, n0, n1);
    for (; r + 2 <= m; r += 2) tile(std::integral_constant<int, 2>{}, r, n0, n1);
    for (; r < m; ++r) tile(std::integral_constant<int, 1>{}, r, n0, n1);
  }
}

}  // namespace

extern "C" void q4_matmul(const float* x, int64_t m, int64_t k, const uint8_t* packed, const uint16_t* scales,
                          const uint16_t* mins, int64_t n, float* out, int threads) {
  const Activations& a = quantize(x, m, k);
  // 4 rows a tile: with 8 weight registers and 4 accumulators, the 16 AVX2 registers are full.
  run<4>(m, n / 8, threads, [&](auto rows, int64_t r, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      q4_tile<decltype(rows)::value>(a, r, k / kGroup, packed, scales, mins, t, n, out);
  });
}

extern "C" void q4_dequantize(const uint8_t* packed, const uint16_t* scales, const uint16_t* mins,
                              int64_t n, int64_t k, float* weight, int threads) {
  const int64_t groups = k / kGroup;
  const __m128i low = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < n / 8; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t block = t * groups + g;
      for (int p = 0; p < 4; ++p) {
        for (int h = 0; h < 2; ++h) {  // the register's two 16-byte halves: columns 0-3, 4-7
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + block * 128 + 32 * p + 16 * h));
          const __m128i chunks[2] = {_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low)};
          for (int c = 0; c < 4; ++c) {
            const int64_t col = 8 * t + 4 * h + c;
            const __m128 s = _mm_set1_ps(half(scales[block * 8 + 4 * h + c]));
            const __m128 mn = _mm_set1_ps(half(mins[block * 8 + 4 * h + c]));
            for (int e = 0; e < 2; ++e) {  // inputs 4p.. (low nibbles) and 4(p + 4).. (high nibbles)
              const __m128 q = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_srli_si128(chunks[e], 4 * c)));
              _mm_storeu_ps(weight + col * k + g * kGroup + 4 * (p + 4 * e), _mm_fmadd_ps(q, s, mn));
            }
          }
        }
      }
    }
  }
}

extern "C" void q8_matmul(const float* x, int64_t m, int64_t k, const int8_t* w, const uint16_t* scales,
                          int64_t n, float* out, int threads) {
  const Activations& a = quantize(x, m, k);
  run<8>(m, n, threads, [&](auto rows, int64_t r, int64_t n0, int64_t n1) {
    q8_rows<decltype(rows)::value>(a, r, k, w, scales, n0, n1, n, out);
  });
}
