// A Llama-family decoder layer's int4 decode step on the CPU in two calls around the attention backend
// (engine/cpu_layer.py builds and calls these): everything before attention (RMSNorm, the fused qkv
// projection, RoPE) and everything after it (o projection, residual add + RMSNorm, gate/up projection,
// SiLU * up, down projection, residual add). The matmuls are cpu_qmatmul.cpp's, the elementwise work
// cpu_pointwise.cpp's, so the arithmetic is the module path's (engine/models/layers.py with engine/
// cpu_pointwise.py and engine/quantization.py), without the Python between a dozen calls, which costs a
// small model's decode step more than the matmuls do. Built with -ffp-contract=off.
//
// Shapes (C order): x, x_out [rows, hidden] float32; q_out [rows, hq, d], k_out and v_out [rows, hk, d]
// float32; attn [rows, hq * d] float32; cos, sin [rows, d] float32. An int4 weight is Int4Linear's
// tiles, scales and mins; every output width is a multiple of 8 (no padding columns).
#include <vector>

#include "cpu_pointwise.cpp"
#include "cpu_qmatmul.cpp"

namespace {

struct Int4 {
  const uint8_t* tiles;
  const uint16_t* scales;
  const uint16_t* mins;
};

// Intermediates, reused across calls: a decode step makes two per layer.
thread_local std::vector<float> normed, projected, activated, residual;

float* buffer(std::vector<float>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  return v.data();
}

}  // namespace

extern "C" void attention_input(const float* x, int64_t rows, int64_t hidden, const float* norm_weight, float eps,
                                Int4 qkv, int64_t hq, int64_t hk, int64_t d, const float* cos, const float* sin,
                                float* q_out, float* k_out, float* v_out, int threads) {
  float* h = buffer(normed, rows * hidden);
  rms_norm(x, hidden, nullptr, norm_weight, rows, hidden, eps, 0, nullptr, h, threads);
  const int64_t width = (hq + 2 * hk) * d;
  float* row = buffer(projected, rows * width);
  q4_matmul(h, rows, hidden, qkv.tiles, qkv.scales, qkv.mins, width, row, threads);
  rope(row, width, row + hq * d, width, rows, hq, hk, d, cos, sin, q_out, k_out, threads);
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(row + r * width + (hq + hk) * d, hk * d, v_out + r * hk * d);
}

extern "C" void attention_output(const float* x, const float* attn, int64_t rows, int64_t hidden, int64_t q_size,
                                 Int4 o_proj, const float* norm_weight, float eps, Int4 gate_up_proj,
                                 int64_t intermediate, Int4 down_proj, float* x_out, int threads) {
  float* o = buffer(projected, rows * std::max(hidden, 2 * intermediate));
  q4_matmul(attn, rows, q_size, o_proj.tiles, o_proj.scales, o_proj.mins, hidden, o, threads);
  float* sum = buffer(residual, rows * hidden);
  float* h = buffer(normed, rows * hidden);
  rms_norm(x, hidden, o, norm_weight, rows, hidden, eps, 0, sum, h, threads);
  float* gate_up = o;  // o is in the residual sum now
  q4_matmul(h, rows, hidden, gate_up_proj.tiles, gate_up_proj.scales, gate_up_proj.mins, 2 * intermediate,
            gate_up, threads);
  float* act = buffer(activated, rows * intermediate);
  silu_mul(gate_up, 2 * intermediate, rows, intermediate, act, threads);
  q4_matmul(act, rows, intermediate, down_proj.tiles, down_proj.scales, down_proj.mins, hidden, x_out, threads);
  for (int64_t i = 0; i < rows * hidden; ++i) x_out[i] += sum[i];
}
