// decodekit's native CPU operators (AVX-512): y = x W^T (+ b) for a decoding step's 1 to 8 rows,
// and one GPT block for a single row.
//
// A batch-1 decoding step is a chain of matrix-vector products that each stream a weight from
// memory once. The row kernels (rows.h) read the weight as one sequential stream, a row at a time
// with two accumulators per input row (measured on a 2-core AMD EPYC: 25 GB/s on one thread from
// 4 KB pages, 32 from huge pages, where MKL's and oneDNN's one-row paths streamed 11-18 and did not
// always use the second thread), and the operators split the output rows over torch's own thread
// pool (at::parallel_for). Each output is summed by one thread in a fixed order, so results do not
// depend on the thread count or on the other rows. Built on first use by
// decodekit/kernels/__init__.py; x86-64 with AVX-512 F/BW/VL/DQ, and AVX512-BF16 / AVX512-VNNI for
// the bf16 / w8a8 kernels (the caller checks the CPU's flags).
//
//   linear_f32(x [..., K] f32, w [N, K] f32 (row-major; column-major for one row), b [N]?) -> [..., N]
//   linear_bf16(x, w [N, K] bf16, b?): x rounded to bf16 (nearest even), f32 sums
//   linear_int8(x, w [N, K] i8, scale [N] f32, b?): scale[n] * sum_k x[k] w[n, k]
//   linear_w8a8(x, w [N, K] i8, wsum [N] i32, scale [N] f32, b?): each row rounded to int8 with its
//       own scale (step = max|x| / 127), int8 x int8 into int32, then (sum * step) * scale[n]: the
//       same rounding as decodekit.models.weights.W8A8Linear.
//   gpt_block(...): see below.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <torch/library.h>
#include <immintrin.h>

#include "rows.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace decodekit_rows;

// ------------------------------------------------------------------ the operators

void check_vector(const at::Tensor& t, at::ScalarType type, int64_t n, const char* op, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() && t.numel() == n, op, ": ", what,
              " must be a contiguous ", c10::toString(type), " CPU vector of ", n, " values");
}

void check_matrix(const at::Tensor& w, at::ScalarType type, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == type && w.is_contiguous(), op,
              ": w must be a contiguous ", c10::toString(type), " CPU matrix [N, K]");
}

// the number of rows of x [..., K] (1 to kMaxRows)
int64_t rows_of(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) == K && x.numel() >= K && x.numel() <= kMaxRows * K,
              op, ": x must be a contiguous float32 CPU tensor [..., ", K, "] of 1 to ", kMaxRows, " rows");
  return x.numel() / K;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {  // x's shape with the last size N
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// y [..., N] from a per-range kernel, with the bias added by the same task
template <typename F>
at::Tensor run_rows(const at::Tensor& x, int64_t M, int64_t N, const std::optional<at::Tensor>& bias, const char* op,
                    F rows) {
  const float* b = nullptr;
  if (bias.has_value()) {
    check_vector(*bias, at::kFloat, N, op, "b");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty(out_shape(x, N), x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    rows(yp, n0, n1);
    if (b != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += b[n];
  });
  return y;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kFloat,
              "linear_f32: w must be a float32 CPU matrix [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = rows_of(x, K, "linear_f32");
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  if (w.is_contiguous())
    return run_rows(x, M, N, b, "linear_f32",
                    [&](float* y, int64_t n0, int64_t n1) { for_rows<F32>(M, xp, wp, y, K, N, n0, n1); });
  TORCH_CHECK(w.stride(0) == 1 && w.stride(1) == N && M == 1,
              "linear_f32: w must be row-major (or column-major, for a single row)");
  // column-major: tasks take whole 16-column groups, so that no two write the same vector
  const int64_t groups = (N + 15) / 16;
  at::Tensor y = at::empty({N}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  if (b.has_value()) {
    check_vector(*b, at::kFloat, N, "linear_f32", "b");
    bp = b->data_ptr<float>();
  }
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * 16, n1 = std::min(g1 * 16, N);
    f32_cm_columns(xp, wp, yp, K, N, n0, n1);
    if (bp != nullptr)
      for (int64_t n = n0; n < n1; ++n) yp[n] += bp[n];
  });
  return y.view(out_shape(x, N));
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check_matrix(w, at::kBFloat16, "linear_bf16");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = rows_of(x, K, "linear_bf16");
  const at::Tensor xb = x.to(at::kBFloat16);  // nearest even, as the library path rounds
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  return run_rows(x, M, N, b, "linear_bf16",
                  [&](float* y, int64_t n0, int64_t n1) { for_rows<BF16>(M, xp, wp, y, K, N, n0, n1); });
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& b) {
  check_matrix(w, at::kChar, "linear_int8");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = rows_of(x, K, "linear_int8");
  check_vector(scale, at::kFloat, N, "linear_int8", "scale");
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  return run_rows(x, M, N, b, "linear_int8",
                  [&](float* y, int64_t n0, int64_t n1) { for_rows<Int8>(M, xp, wp, sp, y, K, N, n0, n1); });
}

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& scale,
                       const std::optional<at::Tensor>& b) {
  check_matrix(w, at::kChar, "linear_w8a8");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = rows_of(x, K, "linear_w8a8");
  check_vector(wsum, at::kInt, N, "linear_w8a8", "wsum");
  check_vector(scale, at::kFloat, N, "linear_w8a8", "scale");
  const float* xp = x.data_ptr<float>();
  // each row's scale and int8 values, as W8A8Linear rounds them: step = max|x| / 127 (at least the
  // smallest normal float), q = round-half-even(x / step)
  float step[kMaxRows];
  at::Tensor xu = at::empty({M, K}, x.options().dtype(at::kByte));
  uint8_t* up = xu.data_ptr<uint8_t>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
    step[m] = std::max(amax / 127.f, FLT_MIN);
    for (int64_t k = 0; k < K; ++k) up[m * K + k] = (uint8_t)((int32_t)std::nearbyint(row[k] / step[m]) + 128);
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* sump = wsum.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const float* stp = step;
  return run_rows(x, M, N, b, "linear_w8a8", [&](float* y, int64_t n0, int64_t n1) {
    for_rows<W8A8>(M, up, wp, sump, sp, stp, y, K, N, n0, n1);
  });
}

// ------------------------------------------------------------------ one GPT block, one row

using Parts = c10::List<std::optional<at::Tensor>>;

at::Tensor part(const Parts& p, size_t i) { return p.get(i).has_value() ? *p.get(i) : at::Tensor(); }

std::optional<at::Tensor> maybe(const Parts& p, size_t i) {
  return p.get(i).has_value() ? p.get(i) : std::nullopt;
}

// a projection of the single row x [K] in the format `kind` names: 0 float32 [w, b], 1 bf16 [w, b],
// 2 int8 [w, scale, b], 3 int8 x int8 [w, wsum, scale, b]
at::Tensor project(const at::Tensor& x, int64_t kind, const Parts& p) {
  switch (kind) {
    case 0: return linear_f32(x, part(p, 0), maybe(p, 1));
    case 1: return linear_bf16(x, part(p, 0), maybe(p, 1));
    case 2: return linear_int8(x, part(p, 0), part(p, 1), maybe(p, 2));
    case 3: return linear_w8a8(x, part(p, 0), part(p, 1), part(p, 2), maybe(p, 3));
  }
  TORCH_CHECK(false, "gpt_block: unknown projection kind ", kind);
}

// One query per head against positions 0 .. S-1 of the cache (the new key and value written at `pos`
// first): softmax(q k^T / sqrt(D) + mask) v, in float32. keys/values: [H, L, D] of one row.
void attend(const float* qkv, float* y, float* keys, float* values, int64_t H, int64_t D, int64_t head_stride,
            int64_t pos_stride, int64_t pos, int64_t S, const float* mask) {
  const int64_t C = H * D;
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h) {
      float* kh = keys + h * head_stride;
      float* vh = values + h * head_stride;
      std::copy(qkv + C + h * D, qkv + C + (h + 1) * D, kh + pos * pos_stride);
      std::copy(qkv + 2 * C + h * D, qkv + 2 * C + (h + 1) * D, vh + pos * pos_stride);
      const float* q = qkv + h * D;
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        const float* k = kh + s * pos_stride;
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = mask16(D - d);
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, k + d), a);
        }
        p[s] = _mm512_reduce_add_ps(a) * scale + (mask != nullptr ? mask[s] : 0.f);
        top = std::max(top, p[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
      float* out = y + h * D;
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = mask16(D - d);
        __m512 a = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; ++s)
          if (p[s] != 0.f) a = _mm512_fmadd_ps(_mm512_set1_ps(p[s]), _mm512_maskz_loadu_ps(m, vh + s * pos_stride + d), a);
        _mm512_mask_storeu_ps(out + d, m, _mm512_div_ps(a, _mm512_set1_ps(total)));
      }
    }
  });
}

// A pre-LayerNorm GPT block for one row x [C]: x + attn(ln_1(x)), then + mlp(ln_2(x)).
// norms: [ln_1 weight, ln_1 bias?, ln_2 weight, ln_2 bias?]; kinds: the four projections' formats
// (c_attn, attention c_proj, c_fc, MLP c_proj); keys / values: this layer's cache [B, H, L, D] (row 0
// is this row's); pos: where the new key and value go; mask [S] additive (S = the positions attended).
at::Tensor gpt_block(const at::Tensor& x, const Parts& norms, const Parts& attn, const Parts& proj, const Parts& fc,
                     const Parts& out, at::IntArrayRef kinds, const at::Tensor& keys, const at::Tensor& values,
                     int64_t pos, const at::Tensor& mask, int64_t n_head, double eps, bool tanh) {
  const int64_t C = x.numel();
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat && keys.dim() == 4 &&
                  keys.sizes() == values.sizes() && keys.strides() == values.strides() && keys.stride(3) == 1 &&
                  keys.size(1) == n_head && keys.size(1) * keys.size(3) == C,
              "gpt_block: keys and values must be float32 [B, H, L, D] caches of the same layout");
  const int64_t S = mask.numel();
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && S >= pos + 1 && S <= keys.size(2) &&
                  pos >= 0,
              "gpt_block: mask must be a contiguous float32 row covering the new position");
  const at::Tensor h1 = at::layer_norm(x, at::IntArrayRef{C}, maybe(norms, 0), maybe(norms, 1), eps);
  const at::Tensor qkv = project(h1, kinds[0], attn);
  at::Tensor a = at::empty({C}, x.options());
  attend(qkv.data_ptr<float>(), a.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), n_head,
         keys.size(3), keys.stride(1), keys.stride(2), pos, S, mask.data_ptr<float>());
  const at::Tensor x1 = at::add(x, project(a, kinds[1], proj));
  const at::Tensor h2 = at::layer_norm(x1, at::IntArrayRef{C}, maybe(norms, 2), maybe(norms, 3), eps);
  const at::Tensor f = at::gelu(project(h2, kinds[2], fc), tanh ? "tanh" : "none");
  return at::add(x1, project(f, kinds[3], out));
}

}  // namespace

TORCH_LIBRARY(decodekit_cpu, m) {
  m.def("gpt_block(Tensor x, Tensor?[] norms, Tensor?[] attn, Tensor?[] proj, Tensor?[] fc, Tensor?[] out, "
        "int[] kinds, Tensor keys, Tensor values, int pos, Tensor mask, int n_head, float eps, bool tanh) -> Tensor",
        &gpt_block);
  m.def("linear_f32(Tensor x, Tensor w, Tensor? b) -> Tensor", &linear_f32);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? b) -> Tensor", &linear_bf16);
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, Tensor? b) -> Tensor", &linear_int8);
  m.def("linear_w8a8(Tensor x, Tensor w, Tensor wsum, Tensor scale, Tensor? b) -> Tensor", &linear_w8a8);
}
