// decodekit's native CPU operators (AVX-512): y = x W^T (+ b) for a decoding step's 1 to 8 rows,
// and (blocks.h) attention for one new position per row and whole GPT / Llama steps for 1 to 8 rows.
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
//   linear_int8(x, w [N, K] i8, scale [N] f32, b?): each row rounded to int16 with its own scale (step =
//       max|x| / 32767), int16 x int8 into int32, then (sum * step) * scale[n]
//   linear_w8a8(x, w [N, K] i8, wsum [N] i32, scale [N] f32, b?): each row rounded to int8 with its
//       own scale (step = max|x| / 127), int8 x int8 into int32, then (sum * step) * scale[n]: the
//       same rounding as decodekit.models.weights.W8A8Linear.
//   attention_step(...), gpt_step(...), llama_step(...): see blocks.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty.h>
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

// a row's rounding step: max|x| / levels, at least the smallest normal float; NaN where x holds NaN,
// so that the row's outputs are NaN too
float row_step(const float* x, int64_t K, float levels) {
  __m512 top = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(mask16(K - k), x + k);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan ? NAN : std::max(_mm512_reduce_max_ps(top) / levels, FLT_MIN);
}

// x [K] rounded to int16 with its own scale: q = round-half-even(x / step), step = max|x| / 32767;
// returns step.
float quantize_row16(const float* x, int16_t* q, int64_t K) {
  const float step = row_step(x, K, 32767.f);
  const __m512 s = _mm512_set1_ps(step);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = mask16(K - k);
    _mm512_mask_cvtepi32_storeu_epi16(q + k, m, _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), s)));
  }
  return step;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& b) {
  check_matrix(w, at::kChar, "linear_int8");
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = rows_of(x, K, "linear_int8");
  check_vector(scale, at::kFloat, N, "linear_int8", "scale");
  const float* xp = x.data_ptr<float>();
  float step[kMaxRows];
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  int16_t* qp = xq.data_ptr<int16_t>();
  for (int64_t m = 0; m < M; ++m) step[m] = quantize_row16(xp + m * K, qp + m * K, K);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* stp = step;
  return run_rows(x, M, N, b, "linear_int8",
                  [&](float* y, int64_t n0, int64_t n1) { for_rows<Int8>(M, qp, wp, sp, stp, y, K, N, n0, n1); });
}

// x [K] rounded to int8 as u = q + 128 (q = round-half-even(x / step), |q| <= 127); returns step =
// max|x| / 127, at least the smallest normal float. Vector division and conversion (in the default
// rounding mode) give the bits of the scalar x / step and nearbyint.
float quantize_row(const float* x, uint8_t* u, int64_t K) {
  const float step = row_step(x, K, 127.f);
  const __m512 s = _mm512_set1_ps(step);
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = mask16(K - k);
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), s)), bias);
    _mm512_mask_cvtepi32_storeu_epi8(u + k, m, q);
  }
  return step;
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
  for (int64_t m = 0; m < M; ++m) step[m] = quantize_row(xp + m * K, up + m * K, K);
  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* sump = wsum.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const float* stp = step;
  return run_rows(x, M, N, b, "linear_w8a8", [&](float* y, int64_t n0, int64_t n1) {
    for_rows<W8A8>(M, up, wp, sump, sp, stp, y, K, N, n0, n1);
  });
}

// ------------------------------------------------------------------ a greedy step's argmax

// The first index of each row's maximum, x [B, V] float32 -> [B] int64, in one vectorised pass for the
// maximum and one to find it (an infinite maximum included); a row holding NaN gives 0, as
// decodekit.samplers.base.argmax does. A greedy step after the weights have flushed the caches took
// 0.15-0.25 ms less through one operator than through that function's ten.
void check_logits(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                  x.size(1) > 0,
              op, ": x must be a contiguous float32 CPU matrix [B, V] with V > 0");
}

// the largest of r[0 .. V-1], NaN where any is NaN
float row_max(const float* r, int64_t V) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t k = 0; k < V; k += 16) {
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask16(V - k), r + k);
    top = _mm512_max_ps(top, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan ? NAN : _mm512_reduce_max_ps(top);
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_logits(x, "argmax_rows");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = xp + b * V;
    const float best = row_max(r, V);
    op[b] = 0;
    if (std::isnan(best)) continue;
    const __m512 target = _mm512_set1_ps(best);
    for (int64_t k = 0; k < V; k += 16) {
      const __mmask16 m = mask16(V - k);
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, r + k), target, _CMP_EQ_OQ);
      if (hit) {
        op[b] = k + __builtin_ctz(hit);
        break;
      }
    }
  }
  return out;
}

// [B] bool: the rows of x [B, V] float32 holding NaN or +inf, or with every value -inf (every token
// removed), in one pass each: decodekit.processors.base.invalid_rows's answer.
at::Tensor invalid_rows(const at::Tensor& x) {
  check_logits(x, "invalid_rows");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kBool));
  bool* op = out.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) op[b] = !std::isfinite(row_max(x.data_ptr<float>() + b * V, V));
  return out;
}

// ------------------------------------------------------------------ a step's bookkeeping

// The decoding loop's record of a step's tokens (decodekit.loop.settle): a finished row's token becomes
// pad; each token is written at seq[b, end]; an unfinished row's length grows by one (in place); a
// row whose token is among eos finishes with reason 1. Returns (tokens, finished, reason), new
// tensors: one operator where the loop's torch version takes about twelve.
std::tuple<at::Tensor, at::Tensor, at::Tensor> settle_rows(const at::Tensor& token, const at::Tensor& finished,
                                                           const at::Tensor& reason, at::Tensor& lengths,
                                                           at::Tensor& seq, int64_t end, const at::Tensor& eos,
                                                           int64_t pad) {
  const int64_t B = finished.numel();
  TORCH_CHECK(token.device().is_cpu() && token.scalar_type() == at::kLong && token.dim() == 1 && token.size(0) == B &&
                  finished.scalar_type() == at::kBool && finished.is_contiguous() && reason.scalar_type() == at::kChar &&
                  reason.is_contiguous() && reason.numel() == B && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous() && lengths.numel() == B,
              "settle_rows: token [B] int64, finished [B] bool, reason [B] int8 and lengths [B] int64 on CPU");
  TORCH_CHECK(seq.scalar_type() == at::kLong && seq.dim() == 2 && seq.size(0) == B && end >= 0 && end < seq.size(1) &&
                  eos.scalar_type() == at::kLong && eos.dim() == 1 && eos.is_contiguous(),
              "settle_rows: seq must be int64 [B, T] with end < T, eos an int64 vector");
  at::Tensor out = at::empty({B}, token.options()), done = at::empty_like(finished), why = at::empty_like(reason);
  const int64_t *tp = token.data_ptr<int64_t>(), *ep = eos.data_ptr<int64_t>();
  const bool* fp = finished.data_ptr<bool>();
  const int8_t* rp = reason.data_ptr<int8_t>();
  int64_t *op = out.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>(), *sp = seq.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = fp[b] ? pad : tp[b * token.stride(0)];
    op[b] = t;
    sp[b * seq.stride(0) + end * seq.stride(1)] = t;
    lp[b] += !fp[b];
    const bool hit = !fp[b] && std::find(ep, ep + eos.numel(), t) != ep + eos.numel();
    done.data_ptr<bool>()[b] = fp[b] || hit;
    why.data_ptr<int8_t>()[b] = hit ? 1 : rp[b];
  }
  return {out, done, why};
}

// ------------------------------------------------------------------ the blocks' projections

using Parts = c10::List<std::optional<at::Tensor>>;

at::Tensor part(const Parts& p, size_t i) { return p.get(i).has_value() ? *p.get(i) : at::Tensor(); }

std::optional<at::Tensor> maybe(const Parts& p, size_t i) {
  return p.get(i).has_value() ? p.get(i) : std::nullopt;
}

// how many tensors each projection kind takes (see project)
constexpr size_t kParts[4] = {2, 2, 3, 4};

// a projection of the rows x [B, K] (1 to 8) in the format `kind` names, its tensors from p[at]:
// 0 float32 [w, b], 1 bf16 [w, b], 2 int8 [w, scale, b], 3 int8 x int8 [w, wsum, scale, b]
at::Tensor project(const at::Tensor& x, int64_t kind, const Parts& p, size_t at = 0) {
  switch (kind) {
    case 0: return linear_f32(x, part(p, at), maybe(p, at + 1));
    case 1: return linear_bf16(x, part(p, at), maybe(p, at + 1));
    case 2: return linear_int8(x, part(p, at), part(p, at + 1), maybe(p, at + 2));
    case 3: return linear_w8a8(x, part(p, at), part(p, at + 1), part(p, at + 2), maybe(p, at + 3));
  }
  TORCH_CHECK(false, "unknown projection kind ", kind);
}

}  // namespace

#include "blocks.h"  // attention and whole steps, on the products above

TORCH_LIBRARY(decodekit_cpu, m) {
  m.def("gpt_step(Tensor ids, Tensor positions, Tensor? attention_mask, Tensor? lengths, int length, int span, "
        "Tensor wte, Tensor wpe, Tensor?[] parts, int[] kinds, Tensor keys, Tensor values, int n_head, float eps, "
        "bool tanh) -> Tensor",
        &gpt_step);
  m.def("attention_step(Tensor qkv, Tensor keys, Tensor values, int[] pos, Tensor mask, int n_head) -> Tensor",
        &attention_step);
  m.def("llama_step(Tensor ids, Tensor positions, Tensor? attention_mask, Tensor? lengths, int length, int span, "
        "Tensor emb, Tensor?[] parts, int[] kinds, Tensor keys, Tensor values, int n_head, float eps, Tensor cos, "
        "Tensor sin) -> Tensor",
        &llama_step);
  m.def("linear_f32(Tensor x, Tensor w, Tensor? b) -> Tensor", &linear_f32);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
  m.def("invalid_rows(Tensor x) -> Tensor", &invalid_rows);
  m.def("settle_rows(Tensor token, Tensor finished, Tensor reason, Tensor(a!) lengths, Tensor(b!) seq, int end, "
        "Tensor eos, int pad) -> (Tensor, Tensor, Tensor)",
        &settle_rows);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? b) -> Tensor", &linear_bf16);
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, Tensor? b) -> Tensor", &linear_int8);
  m.def("linear_w8a8(Tensor x, Tensor w, Tensor wsum, Tensor scale, Tensor? b) -> Tensor", &linear_w8a8);
}
