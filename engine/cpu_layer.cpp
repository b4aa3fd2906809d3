// A Llama-family decoder layer's int4 decode step on the CPU in two calls around the attention backend
// (engine/cpu_layer.py builds and calls these): everything before attention (RMSNorm, the fused qkv
// projection, RoPE) and everything after it (o projection, residual add + RMSNorm, gate/up projection,
// SiLU * up, down projection, residual add). The matmuls are torch's own int4 CPU kernel called through
// ATen, so the arithmetic is the module path's (engine/models/layers.py with engine/cpu_pointwise.py),
// without the Python between a dozen calls, which costs a small model's decode step more than the
// matmuls do. Linked against the running torch's libtorch_cpu; built with -ffp-contract=off.
//
// Shapes (C order): x, x_out [rows, hidden] float32; q_out [rows, hq, d], k_out and v_out [rows, hk, d]
// float32; attn [rows, hq * d] float32; cos, sin [rows, d] float32. An int4 weight is its packed
// [n, k / 2] uint8 and its bf16 scales and zeros [k / 32, n, 2], as Int4Linear keeps them.
#include <ATen/ATen.h>

#include <vector>

#include "cpu_pointwise.cpp"

namespace {

struct Int4 {
  const void* packed;
  const void* scales_zeros;
  int64_t n, k;
};

// [rows, k] bf16 @ W.T -> [rows, n] bf16
at::Tensor int4_mm(const at::Tensor& x, const Int4& w) {
  auto packed = at::from_blob(const_cast<void*>(w.packed), {w.n, w.k / 2}, at::kByte);
  auto scales = at::from_blob(const_cast<void*>(w.scales_zeros), {w.k / 32, w.n, 2}, at::kBFloat16);
  return at::_weight_int4pack_mm_for_cpu(x, packed, 32, scales);
}

at::Tensor bf16(int64_t rows, int64_t cols) { return at::empty({rows, cols}, at::kBFloat16); }

}  // namespace

extern "C" void attention_input(const float* x, int64_t rows, int64_t hidden, const float* norm_weight, float eps,
                                const void* qkv_packed, const void* qkv_scales, int64_t hq, int64_t hk, int64_t d,
                                const float* cos, const float* sin, float* q_out, float* k_out, float* v_out,
                                int threads) {
  at::Tensor h = bf16(rows, hidden);
  rms_norm(x, hidden, 0, nullptr, 0, norm_weight, rows, hidden, eps, 0, nullptr, h.data_ptr(), 1, threads);
  const int64_t width = (hq + 2 * hk) * d;
  at::Tensor qkv = int4_mm(h, Int4{qkv_packed, qkv_scales, width, hidden});
  const uint16_t* row = static_cast<const uint16_t*>(qkv.data_ptr());
  rope(row, width, row + hq * d, width, 1, rows, hq, hk, d, cos, sin, q_out, k_out, threads);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < hk * d; ++i) v_out[r * hk * d + i] = load1(row, r * width + (hq + hk) * d + i, 1);
}

extern "C" void attention_output(const float* x, const float* attn, int64_t rows, int64_t hidden, int64_t q_size,
                                 const void* o_packed, const void* o_scales, const float* norm_weight, float eps,
                                 const void* gate_up_packed, const void* gate_up_scales, int64_t intermediate,
                                 const void* down_packed, const void* down_scales, float* x_out, int threads) {
  at::Tensor a = bf16(rows, q_size);
  for (int64_t i = 0; i < rows * q_size; ++i) store1(a.data_ptr(), i, attn[i], 1);
  at::Tensor o = int4_mm(a, Int4{o_packed, o_scales, hidden, q_size});
  std::vector<float> residual(rows * hidden);
  at::Tensor h = bf16(rows, hidden);
  rms_norm(x, hidden, 0, o.data_ptr(), 1, norm_weight, rows, hidden, eps, 0, residual.data(), h.data_ptr(), 1,
           threads);
  at::Tensor gate_up = int4_mm(h, Int4{gate_up_packed, gate_up_scales, 2 * intermediate, hidden});
  at::Tensor act = bf16(rows, intermediate);
  silu_mul(gate_up.data_ptr(), 2 * intermediate, 1, rows, intermediate, act.data_ptr(), 1, threads);
  at::Tensor down = int4_mm(act, Int4{down_packed, down_scales, hidden, intermediate});
  for (int64_t i = 0; i < rows * hidden; ++i) x_out[i] = residual[i] + load1(down.data_ptr(), i, 1);
}
