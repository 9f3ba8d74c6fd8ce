// decodekit's native attention step and whole transformer blocks for a decoding step's 1 to 8 rows,
// one new position each. Included by cpu.cpp after the products (project) they call.
//
//   attention_step(qkv [B, 3C], keys, values, pos, mask, n_head) -> [B, C]: GPT's attention.
//   gpt_step(ids [B], positions [B], ...) -> [B, V]: a whole step of a GPT (embeddings, pre-LayerNorm
//       blocks, ln_f and the head) for B rows.
//   llama_step(ids [B], positions [B], ...) -> [B, V]: a whole step of a Llama (RMSNorm, rotary
//       positions, grouped-query attention, SwiGLU).
//
// Each row's arithmetic is the same whatever the other rows: the products sum each row alone, and
// attention takes each row and head alone. The key / value cache is float32 or bfloat16
// (model.kv_cache=bf16: each new key and value rounded once as it is written, read widened to float32).
#pragma once

namespace {

// e^x for 16 values x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, then scaled by
// 2^n; within 2 ulp of std::exp); below -87.3 (and -inf) gives 0, NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);  // NaN passes (the second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.9875691500e-4f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.3981999507e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(8.3334519073e-3f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(4.1665795894e-2f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.6666665459e-1f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(5.0000001201e-1f));
  e = _mm512_fmadd_ps(e, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(e, n));
}

// Where each row's new keys / values come from and go: row b's queries [H, D] at q + b * q_row, its
// new keys and values [Hkv, D] at k + b * k_row and v + b * v_row; the cache keys / values [B, Hkv,
// L, D] (float32, or bfloat16 where bf16) with strides st; the new position pos[b]; mask [B, S]
// additive (-inf hides a position).
struct Step {
  const float *q, *k, *v;
  int64_t q_row, k_row, v_row;
  void *keys, *values;
  bool bf16;
  const int64_t* st;
  int64_t B, H, Hkv, D, S;
  const int64_t* pos;
  const float* mask;
};

// A cache's values, float32 or bfloat16 (a float32's upper 16 bits): 16 of them as float32, and a
// row of D float32 values stored, rounded to bfloat16 as torch rounds (nearest even; NaN stays NaN).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store_row(const float* x, float* out, int64_t D) { std::copy(x, x + D, out); }
inline void store_row(const float* x, uint16_t* out, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = mask16(D - d);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + d);
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm512_mask_cvtepi32_storeu_epi16(out + d, m, r);
  }
}

// Asks for the cache lines of position s of a head's keys or values (rows of D values, `stride` apart).
template <typename T>
inline void fetch_row(const T* rows, int64_t stride, int64_t s, int64_t D) {
  const char* at = (const char*)(rows + s * stride);
  for (int64_t b = 0; b < D * (int64_t)sizeof(T); b += 64) _mm_prefetch(at + b, _MM_HINT_T0);
}
constexpr int64_t kAheadRows = 16;  // positions of keys asked for ahead of the one in use

// One query per row and head against positions 0 .. S-1 of the row's cache, after each row's new
// keys and values are written: softmax(q k^T / sqrt(D) + mask) v in float32, query head h reading
// key / value head h / (H / Hkv). y: [B, H * D]. T: the cache's values (float, or uint16_t for bfloat16).
// The cache comes from memory (a step's weights evict it), in short runs: each row and head's keys,
// then its values. Reading a head's keys asks for its keys kAheadRows on and its values; reading
// its values, for the next head's first keys (measured: 12 layers of GPT-2 124M's attention, 8 rows
// of 200 positions from memory, 6.7 -> 6.0 ms with a float32 cache, 4.7 -> 3.8 with bfloat16).
template <typename T>
void attend_as(const Step& a, float* y) {
  const int64_t D = a.D, S = a.S, group = a.H / a.Hkv;
  T* const keys = static_cast<T*>(a.keys);
  T* const values = static_cast<T*>(a.values);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.Hkv; ++g) {
      const int64_t at = b * a.st[0] + g * a.st[1] + a.pos[b] * a.st[2];
      store_row(a.k + b * a.k_row + g * D, keys + at, D);
      store_row(a.v + b * a.v_row + g * D, values + at, D);
    }
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    const auto head = [&](int64_t i, T* cache) { return cache + i / a.H * a.st[0] + i % a.H / group * a.st[1]; };
    for (int64_t s = 0; s < std::min(S, kAheadRows); ++s) fetch_row(head(i0, keys), a.st[2], s, D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / a.H, h = i % a.H;
      const float* add = a.mask + b * S;
      const T* kh = head(i, keys);
      const T* vh = head(i, values);
      const T* next = i + 1 < i1 ? head(i + 1, keys) : nullptr;
      const float* q = a.q + b * a.q_row + h * D;
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (s + kAheadRows < S) fetch_row(kh, a.st[2], s + kAheadRows, D);
        fetch_row(vh, a.st[2], s, D);
        const T* k = kh + s * a.st[2];
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = mask16(D - d);
          acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16(k + d, m), acc);
        }
        p[s] = _mm512_reduce_add_ps(acc) * scale + add[s];
        top = std::max(top, p[s]);
      }
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; s += 16) {
        const __mmask16 m = mask16(S - s);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.data() + s), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(p.data() + s, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
      }
      const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
      float* out = y + b * a.H * D + h * D;
      for (int64_t d = 0; d < D; d += 64) {  // 64 columns at a time: four independent sums
        const __mmask16 m0 = mask16(D - d), m1 = mask16(D - d - 16), m2 = mask16(D - d - 32), m3 = mask16(D - d - 48);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t s = 0; s < S; ++s) {
          if (d == 0 && next != nullptr && s < kAheadRows) fetch_row(next, a.st[2], s, D);
          if (p[s] == 0.f) continue;  // a hidden position (whatever its row of the cache holds)
          const __m512 w = _mm512_set1_ps(p[s]);
          const T* v = vh + s * a.st[2] + d;
          a0 = _mm512_fmadd_ps(w, load16(v, m0), a0);
          a1 = _mm512_fmadd_ps(w, load16(v + 16, m1), a1);
          a2 = _mm512_fmadd_ps(w, load16(v + 32, m2), a2);
          a3 = _mm512_fmadd_ps(w, load16(v + 48, m3), a3);
        }
        _mm512_mask_storeu_ps(out + d, m0, _mm512_div_ps(a0, total));
        _mm512_mask_storeu_ps(out + d + 16, m1, _mm512_div_ps(a1, total));
        _mm512_mask_storeu_ps(out + d + 32, m2, _mm512_div_ps(a2, total));
        _mm512_mask_storeu_ps(out + d + 48, m3, _mm512_div_ps(a3, total));
      }
    }
  });
}

void attend(const Step& a, float* y) { a.bf16 ? attend_as<uint16_t>(a, y) : attend_as<float>(a, y); }

// the checks every attention step makes; returns the step's rows B and span S
std::pair<int64_t, int64_t> check_cache(const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef pos,
                                        const at::Tensor& mask, const char* op) {
  TORCH_CHECK((keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16) &&
                  values.scalar_type() == keys.scalar_type() && keys.dim() == 4 && keys.sizes() == values.sizes() &&
                  keys.strides() == values.strides() && keys.stride(3) == 1,
              op, ": keys and values must be float32 or bfloat16 [B, H, L, D] caches of the same dtype and layout");
  const int64_t B = keys.size(0), S = mask.size(-1);
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == B * S && S <= keys.size(2),
              op, ": mask must be a contiguous float32 [B, S] with S at most the cache's length");
  TORCH_CHECK((int64_t)pos.size() == B, op, ": pos must give one position per row");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S, op, ": a row's new position must be among the S attended");
  return {B, S};
}

// GPT's attention for one new position per row: qkv [B, 3C] (any leading shape with B * 3C values) ->
// [B, C]; each row's new key and value go into keys / values [B, H, L, D] at pos[b], and row b
// attends to its positions 0 .. S-1 under mask [B, S] (additive float32; -inf hides a position).
at::Tensor attention_step(const at::Tensor& qkv, const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef pos,
                          const at::Tensor& mask, int64_t n_head) {
  const auto [B, S] = check_cache(keys, values, pos, mask, "attention_step");
  TORCH_CHECK(keys.size(1) == n_head, "attention_step: the cache must hold n_head heads");
  const int64_t C = n_head * keys.size(3);
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.numel() == B * 3 * C,
              "attention_step: qkv must be a contiguous float32 CPU tensor of ", B, " rows of ", 3 * C, " values");
  at::Tensor y = at::empty({B, C}, qkv.options());
  const float* p = qkv.data_ptr<float>();
  const int64_t st[3] = {keys.stride(0), keys.stride(1), keys.stride(2)};
  attend({p, p + C, p + 2 * C, 3 * C, 3 * C, 3 * C, keys.data_ptr(), values.data_ptr(),
          keys.scalar_type() == at::kBFloat16, st, B, n_head, n_head, keys.size(3), S, pos.data(), mask.data_ptr<float>()},
         y.data_ptr<float>());
  return y;
}

// LayerNorm of each row of x [B, C] in float32: (x - mean) * r * w + b with r = 1 / sqrt(var + eps), the
// mean and the variance (of x - mean) each summed in one pass of 16 lanes. w and b may be undefined
// (1 and 0). torch's layer_norm took ~6 us a call, most of it outside the arithmetic.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t B = x.size(0), C = x.size(1);
  for (const at::Tensor& t : {w, b})
    TORCH_CHECK(!t.defined() || (t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == C),
                "gpt_step: the norms' weights and biases must be contiguous float32 vectors of the width");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.defined() ? w.data_ptr<float>() : nullptr,
              *bp = b.defined() ? b.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < B; ++r) {
    const float* row = xp + r * C;
    float* out = y.data_ptr<float>() + r * C;
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask16(C - k), row + k));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / (float)C);
    __m512 q = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 16) {
      const __mmask16 m = mask16(C - k);
      const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, row + k), mean);
      q = _mm512_fmadd_ps(d, d, q);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(q) / (float)C + (float)eps));
    for (int64_t k = 0; k < C; k += 16) {
      const __mmask16 m = mask16(C - k);
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + k), mean), rstd);
      if (wp) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, wp + k));
      if (bp) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bp + k));
      _mm512_mask_storeu_ps(out + k, m, v);
    }
  }
  return y;
}

// GELU of every value of x in place: the tanh form 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))), or
// the exact 0.5 v (1 + erf(v / sqrt 2)) with erf to 1.5e-7 (Abramowitz and Stegun 7.1.26, as torch's
// vectorised erf). Each within a few 1e-7 of torch's gelu, in one pass (torch's took ~10 us a call).
void gelu_(at::Tensor& x, bool tanh) {
  float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = mask16(n - k);
    const __m512 v = _mm512_maskz_loadu_ps(m, p + k);
    __m512 t;  // tanh(u) or erf(u), u >= 0 here, the sign put back after
    __m512 u;
    if (tanh) {
      u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
      const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(u)));  // tanh|u| = (1 - e) / (1 + e)
      t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    } else {
      u = _mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f));
      const __m512 a = _mm512_abs_ps(u);
      const __m512 s = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
      __m512 poly = _mm512_set1_ps(1.061405429f);
      poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(-1.453152027f));
      poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(1.421413741f));
      poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(-0.284496736f));
      poly = _mm512_fmadd_ps(poly, s, _mm512_set1_ps(0.254829592f));
      poly = _mm512_mul_ps(poly, s);
      t = _mm512_fnmadd_ps(poly, exp16(_mm512_sub_ps(zero, _mm512_mul_ps(a, a))), one);
    }
    t = _mm512_mask_sub_ps(t, _mm512_cmp_ps_mask(u, zero, _CMP_LT_OQ), zero, t);  // odd: the sign of u
    const __m512 g = _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, t));
    _mm512_mask_storeu_ps(p + k, m, _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v));  // NaN stays
  }
}

// y += x, both contiguous float32 of the same size; returns y
at::Tensor& add_(at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK(y.sizes() == x.sizes(), "the projections back to the model's width must give [B, C]");
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t n = y.numel();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = mask16(n - k);
    _mm512_mask_storeu_ps(yp + k, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yp + k), _mm512_maskz_loadu_ps(m, xp + k)));
  }
  return y;
}

// f = silu(f) * g in place (f, g contiguous float32 of one size), SiLU through exp16 on -|v|
void silu_mul_(at::Tensor& f, const at::Tensor& g) {
  TORCH_CHECK(f.sizes() == g.sizes(), "llama_step: w1 and w3 must give the same width");
  float* fp = f.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const int64_t n = f.numel();
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = mask16(n - k);
    const __m512 v = _mm512_maskz_loadu_ps(m, fp + k);
    // sigmoid(v) = 1 / (1 + e^-v): with e = e^-|v|, 1 / (1 + e) for v >= 0, e / (1 + e) below
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __m512 sig = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), r, e);
    _mm512_mask_storeu_ps(fp + k, m, _mm512_mul_ps(_mm512_mul_ps(v, sig), _mm512_maskz_loadu_ps(m, gp + k)));
  }
}

// Where each of n projections' tensors start in a whole step's parts (p[0 .. n-1]), the first at
// `at`, in the formats kinds[0 .. n-1] name; returns the index after the last one's.
size_t place(const int64_t* kinds, int64_t n, size_t at, size_t* p = nullptr) {
  for (int64_t i = 0; i < n; ++i) {
    if (p != nullptr) p[i] = at;
    at += kParts[kinds[i]];
  }
  return at;
}

// A pre-LayerNorm GPT block for B rows (1 to 8) at one new position each, x [B, C]: x + attn(ln_1(x)),
// then + mlp(ln_2(x)). parts[at ..]: ln_1 weight and bias, ln_2 weight and bias (each may be None),
// then the four projections (c_attn, attention c_proj, c_fc, MLP c_proj) in the formats kinds[0 .. 3]
// name, each kind's tensors as project takes them; keys / values: this layer's cache [B, H, L, D];
// pos: where each row's new key and value go; mask [B, S] additive.
at::Tensor gpt_layer(const at::Tensor& x, const Parts& parts, size_t at, const int64_t* kinds, const at::Tensor& keys,
                     const at::Tensor& values, at::IntArrayRef pos, const at::Tensor& mask, int64_t n_head, double eps,
                     bool tanh) {
  size_t p[4];
  place(kinds, 4, at + 4, p);
  const at::Tensor h = layer_norm(x, part(parts, at), part(parts, at + 1), eps);
  const at::Tensor a = attention_step(project(h, kinds[0], parts, p[0]), keys, values, pos, mask, n_head);
  at::Tensor x1 = project(a, kinds[1], parts, p[1]);
  add_(x1, x);
  at::Tensor f = project(layer_norm(x1, part(parts, at + 2), part(parts, at + 3), eps), kinds[2], parts, p[2]);
  gelu_(f, tanh);
  at::Tensor y = project(f, kinds[3], parts, p[3]);
  return add_(y, x1);
}

// The additive mask [B, S] of a step of one new position per row: row b sees positions j <= pos[b]
// that `allowed` [B, S] (bool, any strides; none: all) lets it see, and always its own new one.
at::Tensor step_mask(const std::optional<at::Tensor>& allowed, at::IntArrayRef pos, int64_t S, const char* op) {
  const int64_t B = pos.size();
  const bool* ap = nullptr;
  int64_t sb = 0, sj = 0;  // a window of the loop's mask for the whole run
  if (allowed.has_value()) {
    TORCH_CHECK(allowed->scalar_type() == at::kBool && allowed->dim() == 2 && allowed->size(0) == B &&
                    allowed->size(1) == S,
                op, ": attention_mask must be a bool [B, S]");
    ap = allowed->data_ptr<bool>();
    sb = allowed->stride(0), sj = allowed->stride(1);
  }
  at::Tensor mask = at::empty({B, S}, at::kFloat);
  float* mp = mask.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j)
      mp[b * S + j] = j == pos[b] || (j < pos[b] && (ap == nullptr || ap[b * sb + j * sj])) ? 0.f : -INFINITY;
  return mask;
}

// What a whole step's rows share: ids [B] or [B, 1] (any strides) and their positions, where each
// row's new key and value go (lengths[b], or every row at `length`) and the mask (step_mask).
struct Rows {
  int64_t B;
  std::vector<int64_t> id, position, pos;  // position: clamped at 0 (left padding's -1)
  at::Tensor mask;
};

Rows step_rows(const at::Tensor& ids, const at::Tensor& positions, const std::optional<at::Tensor>& allowed,
               const std::optional<at::Tensor>& lengths, int64_t length, int64_t S, const at::Tensor& k,
               const at::Tensor& v, const char* op) {
  const int64_t B = ids.dim() >= 1 ? ids.size(0) : 0;
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() >= 1 && ids.dim() <= 2 && ids.numel() == B &&
                  positions.scalar_type() == at::kLong && positions.dim() == ids.dim() && positions.numel() == B &&
                  positions.size(0) == B,
              op, ": ids and positions must be int64 [B] or [B, 1], one of each per row");
  TORCH_CHECK(k.dim() == 5 && k.sizes() == v.sizes() && k.size(1) == B, op,
              ": the cache's keys and values must be [L, B, H, Lmax, D], B the rows of ids");
  Rows r{B, std::vector<int64_t>(B), std::vector<int64_t>(B), std::vector<int64_t>(B, length), at::Tensor()};
  for (int64_t b = 0; b < B; ++b) {
    r.id[b] = ids.data_ptr<int64_t>()[b * ids.stride(0)];
    r.position[b] = std::max<int64_t>(positions.data_ptr<int64_t>()[b * positions.stride(0)], 0);
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->is_contiguous() && lengths->numel() == B, op,
                ": lengths must be a contiguous int64 [B]");
    std::copy_n(lengths->data_ptr<int64_t>(), B, r.pos.begin());
  }
  r.mask = step_mask(allowed, r.pos, S, op);
  return r;
}

// checks that parts holds `fixed` tensors plus each projection's for these kinds (n of them)
void check_parts(const Parts& parts, at::IntArrayRef kinds, int64_t n, size_t fixed, const char* op) {
  TORCH_CHECK((int64_t)kinds.size() == n, op, ": kinds must give ", n, " projections (each block's, then the head's)");
  for (int64_t kind : kinds) {
    TORCH_CHECK(kind >= 0 && kind < 4, op, ": unknown projection kind ", kind);
    fixed += kParts[kind];
  }
  TORCH_CHECK(parts.size() == fixed, op, ": parts must hold ", fixed, " tensors for these kinds");
}

// row `id` of a float32 matrix (any strides) into out [C]
void embed_row(const at::Tensor& table, int64_t id, float* out, bool add, const char* op) {
  TORCH_CHECK(id >= 0 && id < table.size(0), op, ": index ", id, " is outside the embedding table of ", table.size(0));
  const float* e = table.data_ptr<float>() + id * table.stride(0);
  const int64_t st = table.stride(1), C = table.size(1);  // GPT-2's tied wte is stored column-major
  for (int64_t c = 0; c < C; ++c) out[c] = add ? out[c] + e[c * st] : e[c * st];
}

void check_table(const at::Tensor& t, int64_t C, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && (C < 0 || t.size(1) == C), op,
              ": the embedding tables must be float32 CPU matrices as wide as the model");
}

// A whole decoding step of a GPT for B rows (1 to 8) at one new position each: the embeddings of
// ids at their positions (wte [V, C], wpe [P, C]), the L blocks, ln_f and the head -> logits [B, V]
// float32. k / v: the cache [L, B, H, Lmax, D]; row b writes its new key and value at lengths[b]
// (none: every row at `length`) and attends to positions 0 .. S-1 as step_mask says. parts: each
// block's as gpt_layer takes them, then ln_f weight and bias and the head's tensors; kinds: four per
// block, then the head's. No Python runs between the blocks, and nothing of torch's but allocation
// and the checks: a batch-1 step took ~0.5 ms of small operators around GPT-2 124M's blocks
// (embeddings, mask, norms, GELU, adds, a call per block).
at::Tensor gpt_step(const at::Tensor& ids, const at::Tensor& positions, const std::optional<at::Tensor>& allowed,
                    const std::optional<at::Tensor>& lengths, int64_t length, int64_t S, const at::Tensor& wte,
                    const at::Tensor& wpe, const Parts& parts, at::IntArrayRef kinds, const at::Tensor& k,
                    const at::Tensor& v, int64_t n_head, double eps, bool tanh) {
  const Rows r = step_rows(ids, positions, allowed, lengths, length, S, k, v, "gpt_step");
  const int64_t L = k.size(0), C = wte.dim() == 2 ? wte.size(1) : -1;
  check_parts(parts, kinds, 4 * L + 1, 4 * L + 2, "gpt_step");
  check_table(wte, C, "gpt_step");
  check_table(wpe, C, "gpt_step");
  at::Tensor x = at::empty({r.B, C}, wte.options());
  for (int64_t b = 0; b < r.B; ++b) {
    embed_row(wte, r.id[b], x.data_ptr<float>() + b * C, false, "gpt_step");
    embed_row(wpe, r.position[b], x.data_ptr<float>() + b * C, true, "gpt_step");
  }
  size_t at = 0;
  for (int64_t l = 0; l < L; ++l) {
    x = gpt_layer(x, parts, at, kinds.data() + 4 * l, k.select(0, l), v.select(0, l), r.pos, r.mask, n_head, eps, tanh);
    at = place(kinds.data() + 4 * l, 4, at + 4);
  }
  return project(layer_norm(x, part(parts, at), part(parts, at + 1), eps), kinds[4 * L], parts, at + 2);
}

// Rotary positions: each head's first 2R values of t [B, heads * D] taken as R adjacent pairs (x0, x1)
// and turned by row b's angles (cos / sin rows rope_pos[b] of [P, R]): (x0 c - x1 s, x0 s + x1 c).
void rotate(at::Tensor& t, int64_t heads, int64_t D, at::IntArrayRef rope_pos, const at::Tensor& cos,
            const at::Tensor& sin) {
  const int64_t R = cos.size(1), B = t.size(0);
  float* p = t.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos.data_ptr<float>() + rope_pos[b] * R;
    const float* s = sin.data_ptr<float>() + rope_pos[b] * R;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = p + (b * heads + h) * D;
      for (int64_t i = 0; i < R; ++i) {
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        v[2 * i] = x0 * c[i] - x1 * s[i];
        v[2 * i + 1] = x0 * s[i] + x1 * c[i];
      }
    }
  }
}

// RMSNorm of each row of x [B, C]: (x * r) * w with r = 1 / sqrt(mean(x^2) + eps), in float32 (torch's
// rms_norm went through about ten small operators a call: 32 us, 0.8 ms a token for a 12-layer model).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(x.is_contiguous() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == C,
              "llama_step: the norms' weights must be contiguous float32 vectors of the width");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xp + b * C;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < C; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(mask16(C - k), row + k);
      a = _mm512_fmadd_ps(v, v, a);
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(a) / (float)C + (float)eps));
    for (int64_t k = 0; k < C; k += 16) {
      const __mmask16 m = mask16(C - k);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), r);
      _mm512_mask_storeu_ps(yp + b * C + k, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, wp + k)));
    }
  }
  return y;
}

// A Llama block for B rows (1 to 8) at one new position each, x [B, C]: h = x + wo(attn(rope(wq n),
// rope(wk n), wv n)) with n = rms_norm(x), then h + w2(silu(w1 m) * w3 m) with m = rms_norm(h).
// parts[at ..]: attention_norm and ffn_norm weights, then the seven projections (wq, wk, wv, wo, w1,
// w3, w2) in the formats kinds[0 .. 6] name, each kind's tensors as project takes them; keys /
// values: this layer's cache [B, Hkv, L, D]; pos: where each row's new key and value go; rope_pos:
// each row's position for the angles (cos / sin [P, R], R = rotated pairs per head); mask [B, S].
at::Tensor llama_layer(const at::Tensor& x, const Parts& parts, size_t at, const int64_t* kinds,
                       const at::Tensor& keys, const at::Tensor& values, at::IntArrayRef pos, at::IntArrayRef rope_pos,
                       const at::Tensor& mask, int64_t n_head, double eps, const at::Tensor& cos,
                       const at::Tensor& sin) {
  const auto [B, S] = check_cache(keys, values, pos, mask, "llama_step");
  const int64_t Hkv = keys.size(1), D = keys.size(3);
  TORCH_CHECK(n_head % Hkv == 0, "llama_step: n_head must be a multiple of the cache's key/value heads");
  size_t p[7];
  place(kinds, 7, at + 2, p);
  const at::Tensor n = rms_norm(x, part(parts, at), eps);
  at::Tensor q = project(n, kinds[0], parts, p[0]), k = project(n, kinds[1], parts, p[1]);
  const at::Tensor v = project(n, kinds[2], parts, p[2]);
  TORCH_CHECK(q.size(1) == n_head * D && k.size(1) == Hkv * D && v.size(1) == Hkv * D,
              "llama_step: the query, key and value projections must give n_head and the cache's heads of its size");
  rotate(q, n_head, D, rope_pos, cos, sin);
  rotate(k, Hkv, D, rope_pos, cos, sin);
  at::Tensor a = at::empty({B, n_head * D}, x.options());
  const int64_t st[3] = {keys.stride(0), keys.stride(1), keys.stride(2)};
  attend({q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), n_head * D, Hkv * D, Hkv * D,
          keys.data_ptr(), values.data_ptr(), keys.scalar_type() == at::kBFloat16, st, B, n_head, Hkv, D, S,
          pos.data(), mask.data_ptr<float>()},
         a.data_ptr<float>());
  at::Tensor h = project(a, kinds[3], parts, p[3]);
  add_(h, x);
  const at::Tensor m = rms_norm(h, part(parts, at + 1), eps);
  at::Tensor f = project(m, kinds[4], parts, p[4]);
  silu_mul_(f, project(m, kinds[5], parts, p[5]));
  at::Tensor y = project(f, kinds[6], parts, p[6]);
  return add_(y, h);
}

// A whole decoding step of a Llama for B rows (1 to 8), as gpt_step: the embeddings of ids (emb
// [V, C]), the L blocks (rotary angles at each row's position: cos / sin [P, R]), the final RMSNorm
// and the head -> logits [B, V] float32. parts: each block's as llama_layer takes them, then the
// final norm's weight and the head's tensors; kinds: seven per block, then the head's.
at::Tensor llama_step(const at::Tensor& ids, const at::Tensor& positions, const std::optional<at::Tensor>& allowed,
                      const std::optional<at::Tensor>& lengths, int64_t length, int64_t S, const at::Tensor& emb,
                      const Parts& parts, at::IntArrayRef kinds, const at::Tensor& k, const at::Tensor& v,
                      int64_t n_head, double eps, const at::Tensor& cos, const at::Tensor& sin) {
  const Rows r = step_rows(ids, positions, allowed, lengths, length, S, k, v, "llama_step");
  const int64_t L = k.size(0);
  check_parts(parts, kinds, 7 * L + 1, 2 * L + 1, "llama_step");
  check_table(emb, -1, "llama_step");
  const int64_t C = emb.size(1);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.is_contiguous() && cos.sizes() == sin.sizes() &&
                  sin.is_contiguous() && 2 * cos.size(1) <= k.size(4),
              "llama_step: cos and sin must be contiguous float32 [P, R] tables with 2R at most the head size");
  for (int64_t b = 0; b < r.B; ++b)
    TORCH_CHECK(r.position[b] < cos.size(0), "llama_step: a rotary position is past the tables");
  at::Tensor x = at::empty({r.B, C}, emb.options());
  for (int64_t b = 0; b < r.B; ++b) embed_row(emb, r.id[b], x.data_ptr<float>() + b * C, false, "llama_step");
  size_t at = 0;
  for (int64_t l = 0; l < L; ++l) {
    x = llama_layer(x, parts, at, kinds.data() + 7 * l, k.select(0, l), v.select(0, l), r.pos, r.position, r.mask,
                    n_head, eps, cos, sin);
    at = place(kinds.data() + 7 * l, 7, at + 2);
  }
  return project(rms_norm(x, part(parts, at), eps), kinds[7 * L], parts, at + 1);
}

}  // namespace
