// Decode attention that reads K/V where they lie in the paged cache (attention/cpu_decode.py builds
// and calls it). One query row attends over the positions it reads, page by page, with an online
// softmax; nothing of the context is copied. Built with -mavx2 -mfma -mf16c (no AVX-512).
//
// Shapes (C order): q, out [R, H, G, D] float32; lse [R, H, G] float32 (may be null); caches
// [pages, page_size, Hkv, D] in fp32, fp16 or bf16; key_tables, value_tables [R, P] int32 (page of
// each page_size positions); kv_heads [H] int64 (the cache head query group h reads). A row reads
// positions starts[r] .. lengths[r] - 1 (dense; a sliding window starts past 0), or, with positions
// [R, H, N] int64 and valid [R, H, N] bool, the valid ones among its N listed positions (sparse).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using simd::exp8;
using simd::hmax;
using simd::hsum;

constexpr int kBlock = 16;  // positions scored together before their values are accumulated

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <int DT> inline __m256 load8(const void* p, int64_t i);
template <> inline __m256 load8<kF32>(const void* p, int64_t i) {
  return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}
template <> inline __m256 load8<kF16>(const void* p, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
}
template <> inline __m256 load8<kBF16>(const void* p, int64_t i) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// The sums of eight vectors, as one vector (lane t: the sum of v[t]).
inline __m256 sum8(const __m256* v) {
  __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

struct Args {
  const float* q;
  const void* k;
  const void* v;
  const int32_t* key_tables;
  const int32_t* value_tables;
  const int64_t* starts;
  const int64_t* lengths;
  const int64_t* positions;
  const bool* valid;
  const int64_t* kv_heads;
  int64_t R, H, G, D, Hkv, P, N, page_size, key_pages, value_pages;
  float scale;
};

// Running softmax state of one (row, head, chunk): max m, sum l and unnormalised output per query.
struct Partial {
  std::vector<float> m, l, acc;
};

inline int64_t page_of(const int32_t* table, int64_t pos, int64_t page_size, int64_t pages) {
  int64_t page = table[pos / page_size];
  return page < 0 ? 0 : (page >= pages ? pages - 1 : page);
}

// G (the query heads sharing a KV head) is a template argument so that the accumulators stay in registers.
template <int DT, int G>
void attend_chunk(const Args& a, int64_t r, int64_t h, int64_t begin, int64_t end, Partial& out) {
  const int64_t D = a.D, ps = a.page_size;
  const int64_t kh = a.kv_heads[h];
  const float* q = a.q + (r * a.H + h) * G * D;
  const int32_t* ktab = a.key_tables + r * a.P;
  const int32_t* vtab = a.value_tables + r * a.P;
  const int64_t* pos_list = a.positions ? a.positions + (r * a.H + h) * a.N : nullptr;
  const bool* ok = a.valid ? a.valid + (r * a.H + h) * a.N : nullptr;
  out.m.assign(G, -INFINITY);
  out.l.assign(G, 0.f);
  out.acc.assign(G * D, 0.f);
  alignas(32) float p[G][kBlock];
  int64_t at[2][2][kBlock];  // [this block, the next][keys, values]: element offsets of each position read
  const int64_t row_bytes = D * (DT == kF32 ? 4 : 2);
  auto locate = [&](int64_t b0, int64_t (*into)[kBlock]) {
    int n = 0;
    for (int64_t i = b0; i < end && i < b0 + kBlock; ++i) {
      if (ok && !ok[i]) continue;
      int64_t pos = pos_list ? pos_list[i] : i;
      int64_t row = pos % ps;
      into[0][n] = ((page_of(ktab, pos, ps, a.key_pages) * ps + row) * a.Hkv + kh) * D;
      into[1][n] = ((page_of(vtab, pos, ps, a.value_pages) * ps + row) * a.Hkv + kh) * D;
      ++n;
    }
    return n;
  };
  // The rows of one head are scattered (a page's rows are Hkv heads apart, its pages anywhere): fetch
  // the next block's while this one computes.
  auto prefetch = [&](const void* base, const int64_t* offsets, int n) {
    const char* bytes = static_cast<const char*>(base);
    for (int t = 0; t < n; ++t)
      for (int64_t b = 0; b < row_bytes; b += 64)
        _mm_prefetch(bytes + offsets[t] * (row_bytes / D) + b, _MM_HINT_T0);
  };
  int next_n = locate(begin, at[1]);
  prefetch(a.k, at[1][0], next_n);
  prefetch(a.v, at[1][1], next_n);
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    int n = next_n;
    std::copy(&at[1][0][0], &at[1][0][0] + 2 * kBlock, &at[0][0][0]);
    next_n = locate(b0 + kBlock, at[1]);
    prefetch(a.k, at[1][0], next_n);
    prefetch(a.v, at[1][1], next_n);
    int64_t* key_at = at[0][0];
    const int64_t* value_at = at[0][1];
    if (n == 0) continue;
    for (int t = n; t < kBlock; ++t) key_at[t] = key_at[0];  // scored, then masked out
    for (int half = 0; half < kBlock; half += 8) {
      if (half >= n) {
        for (int g = 0; g < G; ++g) _mm256_store_ps(p[g] + half, _mm256_set1_ps(-INFINITY));
        continue;
      }
      __m256 dots[G][8];
      for (int t = 0; t < 8; ++t) {  // each key row is loaded (and converted) once for the G queries
        __m256 dot[G];
        for (int g = 0; g < G; ++g) dot[g] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          __m256 key = load8<DT>(a.k, key_at[half + t] + d);
          for (int g = 0; g < G; ++g) dot[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), key, dot[g]);
        }
        for (int g = 0; g < G; ++g) dots[g][t] = dot[g];
      }
      for (int g = 0; g < G; ++g)
        _mm256_store_ps(p[g] + half, _mm256_mul_ps(sum8(dots[g]), _mm256_set1_ps(a.scale)));
    }
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 live0 = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
    const __m256 live1 = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n - 8)), _CMP_LT_OQ);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 rescale[G];
    for (int g = 0; g < G; ++g) {
      __m256 s0 = _mm256_blendv_ps(ninf, _mm256_load_ps(p[g]), live0);
      __m256 s1 = _mm256_blendv_ps(ninf, _mm256_load_ps(p[g] + 8), live1);
      float mx = std::max(out.m[g], hmax(_mm256_max_ps(s0, s1)));
      __m256 m = _mm256_set1_ps(mx);
      __m256 e0 = exp8(_mm256_sub_ps(s0, m)), e1 = exp8(_mm256_sub_ps(s1, m));
      float shrink = std::exp(out.m[g] - mx);
      out.l[g] = out.l[g] * shrink + hsum(_mm256_add_ps(e0, e1));
      out.m[g] = mx;
      rescale[g] = _mm256_set1_ps(shrink);
      _mm256_store_ps(p[g], e0);
      _mm256_store_ps(p[g] + 8, e1);
    }
    for (int64_t d = 0; d < D; d += 8) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_mul_ps(_mm256_loadu_ps(out.acc.data() + g * D + d), rescale[g]);
      for (int t = 0; t < n; ++t) {
        __m256 val = load8<DT>(a.v, value_at[t] + d);
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g][t]), val, acc[g]);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(out.acc.data() + g * D + d, acc[g]);
    }
  }
}

template <int DT, int G>
void run(const Args& a, int64_t chunks, int threads, float* out, float* lse) {
  const int64_t items = a.R * a.H * chunks;
  std::vector<Partial> parts(items);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t it = 0; it < items; ++it) {
    int64_t rh = it / chunks, c = it % chunks, r = rh / a.H, h = rh % a.H;
    int64_t first = a.positions ? 0 : a.starts[r], last = a.positions ? a.N : a.lengths[r];
    int64_t step = (std::max<int64_t>(last - first, 0) + chunks - 1) / chunks;
    int64_t begin = std::min(last, first + c * step), end = std::min(last, begin + step);
    attend_chunk<DT, G>(a, r, h, begin, end, parts[it]);
  }
#pragma omp parallel for num_threads(threads)
  for (int64_t rh = 0; rh < a.R * a.H; ++rh) {
    for (int64_t g = 0; g < a.G; ++g) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, parts[rh * chunks + c].m[g]);
      float total = 0.f;
      float* o = out + (rh * a.G + g) * a.D;
      for (int64_t d = 0; d < a.D; ++d) o[d] = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const Partial& p = parts[rh * chunks + c];
        if (p.l[g] == 0.f) continue;
        float w = std::exp(p.m[g] - mx);
        total += p.l[g] * w;
        for (int64_t d = 0; d < a.D; ++d) o[d] += p.acc[g * a.D + d] * w;
      }
      float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < a.D; ++d) o[d] *= inv;
      if (lse) lse[rh * a.G + g] = total > 0.f ? mx + std::log(total) : -INFINITY;
    }
  }
}

template <int DT>
void dispatch(const Args& a, int64_t chunks, int threads, float* out, float* lse) {
  switch (a.G) {
    case 1: run<DT, 1>(a, chunks, threads, out, lse); break;
    case 2: run<DT, 2>(a, chunks, threads, out, lse); break;
    case 3: run<DT, 3>(a, chunks, threads, out, lse); break;
    case 4: run<DT, 4>(a, chunks, threads, out, lse); break;
    case 5: run<DT, 5>(a, chunks, threads, out, lse); break;
    case 6: run<DT, 6>(a, chunks, threads, out, lse); break;
    case 7: run<DT, 7>(a, chunks, threads, out, lse); break;
    default: run<DT, 8>(a, chunks, threads, out, lse); break;
  }
}

}  // namespace

extern "C" void paged_decode(const float* q, const void* k, const void* v, int dtype,
                             const int32_t* key_tables, const int32_t* value_tables, const int64_t* starts,
                             const int64_t* lengths, const int64_t* positions, const bool* valid, const int64_t* kv_heads,
                             int64_t R, int64_t H, int64_t G, int64_t D, int64_t Hkv, int64_t P, int64_t N,
                             int64_t page_size, int64_t key_pages, int64_t value_pages, float scale,
                             int64_t chunks, int threads, float* out, float* lse) {
  Args a{q, k, v, key_tables, value_tables, starts, lengths, positions, valid, kv_heads,
         R, H, G, D, Hkv, P, N, page_size, key_pages, value_pages, scale};
  if (dtype == kF16) dispatch<kF16>(a, chunks, threads, out, lse);
  else if (dtype == kBF16) dispatch<kBF16>(a, chunks, threads, out, lse);
  else dispatch<kF32>(a, chunks, threads, out, lse);
}

namespace {

template <int DT> inline float key_at(const void* k, int64_t i);
template <> inline float key_at<kF32>(const void* k, int64_t i) { return static_cast<const float*>(k)[i]; }
template <> inline float key_at<kF16>(const void* k, int64_t i) {
  return _cvtsh_ss(static_cast<const uint16_t*>(k)[i]);
}
template <> inline float key_at<kBF16>(const void* k, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(k)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int DT>
void summarise(const void* k, float* kmin, float* kmax, float* kmean, const int64_t* slots, int64_t n,
               int64_t Hkv, int64_t D, int64_t summary_tokens) {
  std::vector<std::pair<int64_t, int64_t>> touched(n);  // (summary, row written)
  for (int64_t i = 0; i < n; ++i) touched[i] = {slots[i] / summary_tokens, slots[i] % summary_tokens};
  std::sort(touched.begin(), touched.end());
  const int64_t width = Hkv * D;
  std::vector<float> total(width);
  for (size_t i = 0; i < touched.size(); ++i) {
    if (i + 1 < touched.size() && touched[i + 1].first == touched[i].first) continue;  // its last row
    const int64_t s = touched[i].first, last = touched[i].second;
    const int64_t first = s * summary_tokens * width;
    float* lo = kmin + s * width;
    float* hi = kmax + s * width;
    for (int64_t c = 0; c < width; ++c) lo[c] = hi[c] = total[c] = key_at<DT>(k, first + c);
    for (int64_t r = 1; r <= last; ++r) {
      for (int64_t c = 0; c < width; ++c) {
        const float key = key_at<DT>(k, first + r * width + c);
        lo[c] = std::min(lo[c], key);
        hi[c] = std::max(hi[c], key);
        total[c] += key;
      }
    }
    const float count = static_cast<float>(last + 1);
    for (int64_t c = 0; c < width; ++c) kmean[s * width + c] = total[c] / count;
  }
}

}  // namespace

// Recompute the key summaries (per-channel min, max and mean over rows 0 .. last row written) of every
// summary of `summary_tokens` rows that slots[0 .. n) write to: kvcache/summaries.py's rule, without
// its dozen torch calls per layer. k [slots, Hkv, D] is float32, fp16 or bf16 (`dtype`), the summaries
// [summaries, Hkv, D] float32; the mean adds rows in order, as torch's sum over them does.
extern "C" void summarise_slots(const void* k, int dtype, float* kmin, float* kmax, float* kmean,
                                const int64_t* slots, int64_t n, int64_t Hkv, int64_t D, int64_t summary_tokens) {
  if (dtype == kF16) summarise<kF16>(k, kmin, kmax, kmean, slots, n, Hkv, D, summary_tokens);
  else if (dtype == kBF16) summarise<kBF16>(k, kmin, kmax, kmean, slots, n, Hkv, D, summary_tokens);
  else summarise<kF32>(k, kmin, kmax, kmean, slots, n, Hkv, D, summary_tokens);
}

// Sparse decode's read list: per (row b, head h), the sink units' S positions, the K chosen units'
// K * unit positions and the recent units' R positions, with which of them are read: a chosen unit is
// read where it is an allowed unit (chosen[b, h, i] in 0 .. U-1, allowed[b, unit]) among the row's
// first k (within_k[b, i]), and each of its positions below ctx[b] (positions clamp to ctx[b] - 1).
// The sink and recent lists are the row's, the same for every head. attention/sparse.py's
// _retrieval_positions does the same in torch.
extern "C" void unit_positions(const int64_t* chosen, int64_t B, int64_t H, int64_t K, const bool* allowed,
                               int64_t U, const bool* within_k, const int64_t* ctx, int64_t unit,
                               const int64_t* sink_pos, const bool* sink_ok, int64_t S, const int64_t* recent_pos,
                               const bool* recent_ok, int64_t R, int64_t* pos, bool* valid) {
  const int64_t n = S + K * unit + R;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      int64_t* p = pos + (b * H + h) * n;
      bool* ok = valid + (b * H + h) * n;
      std::copy(sink_pos + b * S, sink_pos + (b + 1) * S, p);
      std::copy(sink_ok + b * S, sink_ok + (b + 1) * S, ok);
      for (int64_t i = 0; i < K; ++i) {
        const int64_t u = chosen[(b * H + h) * K + i];
        const bool read = u >= 0 && u < U && allowed[b * U + u] && within_k[b * K + i];
        const int64_t first = std::max<int64_t>(u, 0) * unit;
        for (int64_t o = 0; o < unit; ++o) {
          p[S + i * unit + o] = std::min(first + o, ctx[b] - 1);
          ok[S + i * unit + o] = read && first + o < ctx[b];
        }
      }
      std::copy(recent_pos + b * R, recent_pos + (b + 1) * R, p + S + K * unit);
      std::copy(recent_ok + b * R, recent_ok + (b + 1) * R, ok + S + K * unit);
    }
  }
}

// cache[slots[t]] = rows[t] for the step's new keys or values: rows [T, width] float32 into a cache of
// [slots, width] in fp32, fp16 or bf16, rounding to nearest even as torch's casts do (a NaN becomes
// bf16's quiet NaN; torch's own cast paths differ from each other there).
inline void to_f16(uint16_t* dst, const float* src, int64_t width) {
  int64_t i = 0;
  for (; i + 8 <= width; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < width; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

inline void to_bf16(uint16_t* dst, const float* src, int64_t width) {
  for (int64_t i = 0; i < width; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, 4);
    dst[i] = std::isnan(src[i]) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

extern "C" void write_rows(void* cache, int dtype, const int64_t* slots, const float* rows, int64_t t,
                           int64_t width) {
  for (int64_t r = 0; r < t; ++r) {
    const float* src = rows + r * width;
    const int64_t base = slots[r] * width;
    if (dtype == kF32)
      std::memcpy(static_cast<float*>(cache) + base, src, width * sizeof(float));
    else if (dtype == kF16)
      to_f16(static_cast<uint16_t*>(cache) + base, src, width);
    else
      to_bf16(static_cast<uint16_t*>(cache) + base, src, width);
  }
}
