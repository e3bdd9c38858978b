// Weight-only quantized matmuls over llama.cpp's Q4_1 and Q8_0 blocks, fp32 activations.
//
// Layout (workers/quant/blocks.py builds it): for a weight [N, K] with K % 32 == 0,
//   qs: uint8 [N, K / 2] (Q4_1: block b of row n holds elements 32b+j in the low nibble of
//       byte 16b+j and 32b+16+j in its high nibble, as in GGUF) or int8 [N, K] (Q8_0);
//   d, m: float16 [N, K / 32], the blocks' scales and minimums, as GGUF stores them (kept at 16
//   bits: decode is bound by the bytes it reads, and fp32 scales would add a fifth to Q4_1's).
// A weight is q * d + m (Q4_1) or q * d (Q8_0). q * d is exact in fp32 (q has at most 8 bits,
// d at most 11), so every path here sees exactly the weights gguf's own dequantization gives.
//
// y = x @ W.T: each task takes tiles of 4 weight rows, unpacks them into an L1-sized buffer
// once and runs every activation row against it, 8 fp32 accumulators at a time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PIE_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // values per block
constexpr int64_t TILE = 4;  // weight rows per tile

inline float h2f(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

struct Blocks {
  const uint8_t* qs;
  const uint16_t* d;  // fp16 bits
  const uint16_t* m;  // fp16 bits; nullptr for Q8_0
  int64_t rows, nb;  // nb: blocks per row
  bool q4;
};

void unpack_q4_1(const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b, q += 16, out += QK) {
#ifdef PIE_AVX2
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m256 dv = _mm256_set1_ps(h2f(d[b])), mv = _mm256_set1_ps(h2f(m[b]));
    auto put = [&](__m128i bytes, float* o) {
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), dv, mv));
    };
    put(lo, out);
    put(_mm_srli_si128(lo, 8), out + 8);
    put(hi, out + 16);
    put(_mm_srli_si128(hi, 8), out + 24);
#else
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(q[j] & 0x0F) * h2f(d[b]) + h2f(m[b]);
      out[j + 16] = static_cast<float>(q[j] >> 4) * h2f(d[b]) + h2f(m[b]);
    }
#endif
  }
}

void unpack_q8_0(const int8_t* q, const uint16_t* d, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b, q += QK, out += QK) {
#ifdef PIE_AVX2
    const __m256 dv = _mm256_set1_ps(h2f(d[b]));
    for (int j = 0; j < QK; j += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), dv));
    }
#else
    for (int j = 0; j < QK; ++j) out[j] = static_cast<float>(q[j]) * h2f(d[b]);
#endif
  }
}

void unpack_row(const Blocks& w, int64_t row, float* out) {
  const int64_t nb = w.nb;
  if (w.q4)
    unpack_q4_1(w.qs + row * nb * 16, w.d + row * nb, w.m + row * nb, nb, out);
  else
    unpack_q8_0(reinterpret_cast<const int8_t*>(w.qs) + row * nb * QK, w.d + row * nb, nb, out);
}

#ifdef PIE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// y[r] = dot(w + r * K, x) for r < R; K % 16 == 0
template <int R>
void dot_rows(const float* w, int64_t K, const float* x, float* y) {
#ifdef PIE_AVX2
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), x0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k + 8), x1, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(_mm256_add_ps(a[r][0], a[r][1]));
#else
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += w[r * K + k] * x[k];
    y[r] = s;
  }
#endif
}

Blocks blocks_of(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == torch::kHalf && d.is_contiguous(),
              "quantized weight: scales must be a contiguous float16 [rows, blocks] tensor");
  const bool q4 = m.has_value();
  const int64_t rows = d.size(0), nb = d.size(1);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(0) == rows && qs.size(1) == nb * (q4 ? 16 : QK),
              "quantized weight: qs must be contiguous [rows, blocks * ", q4 ? 16 : QK, "]");
  TORCH_CHECK(qs.scalar_type() == (q4 ? torch::kUInt8 : torch::kInt8), "quantized weight: qs has the wrong dtype");
  if (q4)
    TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == torch::kHalf && m->is_contiguous(),
                "quantized weight: minimums must match the scales");
  return Blocks{static_cast<const uint8_t*>(qs.data_ptr()), static_cast<const uint16_t*>(d.data_ptr()),
                q4 ? static_cast<const uint16_t*>(m->data_ptr()) : nullptr, rows, nb, q4};
}

#ifdef PIE_AVX2
// 32 unpacked 4-bit values of a Q4_1 block, as floats (no scale or minimum applied)
inline void q4_floats(const uint8_t* q, __m256 v[4]) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline void q8_floats(const int8_t* q, __m256 v[4]) {
  for (int j = 0; j < 4; ++j)
    v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
}

// Few activation rows (decode): y[i][n] = sum_b d_b * dot(q_b, x_ib) + sum_b m_b * xsum_ib, with
// each block unpacked in registers once for all MR rows and never stored.
template <int MR>
void fused_rows(const Blocks& w, int64_t n0, int64_t n1, const float* x, const float* xsum, int64_t N, float* y) {
  const int64_t nb = w.nb, K = nb * QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* d = w.d + n * nb;
    __m256 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 v[4];
      if (w.q4)
        q4_floats(w.qs + (n * nb + b) * 16, v);
      else
        q8_floats(reinterpret_cast<const int8_t*>(w.qs) + (n * nb + b) * QK, v);
      const __m256 db = _mm256_set1_ps(h2f(d[b]));
      for (int i = 0; i < MR; ++i) {
        const float* xb = x + i * K + b * QK;
        __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xb));
        t = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xb + 8), t);
        t = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xb + 16), t);
        t = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xb + 24), t);
        acc[i] = _mm256_fmadd_ps(t, db, acc[i]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      float s = hsum(acc[i]);
      if (w.q4) {
        const uint16_t* m = w.m + n * nb;
        for (int64_t b = 0; b < nb; ++b) s += h2f(m[b]) * xsum[i * nb + b];
      }
      y[i * N + n] = s;
    }
  }
}
#endif

#ifdef PIE_AVX2
// x quantized per block of 32 as llama.cpp's Q8_1 does for its dot products: q = round(x / dx),
// dx = max|x| / 127, and sx = dx * sum(q) for the minimums' term.
struct QuantRows {
  std::vector<int8_t> q;
  std::vector<float> dx, sx;
};

QuantRows quantize_rows(const float* x, int64_t M, int64_t nb) {
  QuantRows r{std::vector<int8_t>(M * nb * QK), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* xb = x + i * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float dx = amax / 127.f, inv = dx > 0.f ? 1.f / dx : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = static_cast<int>(std::nearbyint(xb[j] * inv));
      r.q[i * QK + j] = static_cast<int8_t>(q);
      sum += q;
    }
    r.dx[i] = dx;
    r.sx[i] = dx * static_cast<float>(sum);
  }
  return r;
}

// A block's 32 weights as bytes: 4-bit values unsigned (low nibbles first), 8-bit ones signed
inline __m256i block_weights(const Blocks& w, int64_t block) {
  if (w.q4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + block * 16));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
  }
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qs + block * QK));
}

// 8 int32 partial sums of the 32 products q_w * q_x, as floats
inline __m256 block_products(__m256i q, const int8_t* qx, bool q4) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx));
  // unsigned 4-bit x signed 8-bit cannot saturate (2 * 15 * 128); for 8-bit weights move the
  // sign onto x: |q_w| * (sign(q_w) q_x), at most 2 * 128 * 127
  const __m256i p16 = q4 ? _mm256_maddubs_epi16(q, x) : _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

// Decode-sized batches, 8-bit activations: y[i][n] = sum_b d_b dx_ib dot(q_b, qx_ib) + m_b sx_ib.
// Two weight rows at a time: two independent accumulator chains, each x block loaded once.
template <int MR>
void fused_rows_a8(const Blocks& w, int64_t n0, int64_t n1, const QuantRows& xq, int64_t N, float* y) {
  const int64_t nb = w.nb;
  for (int64_t n = n0; n < n1; n += 2) {
    const int nr = n + 1 < n1 ? 2 : 1;
    __m256 acc[2][MR];
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      for (int r = 0; r < nr; ++r) {
        const __m256i q = block_weights(w, (n + r) * nb + b);
        const float d = h2f(w.d[(n + r) * nb + b]);
        for (int i = 0; i < MR; ++i)
          acc[r][i] = _mm256_fmadd_ps(block_products(q, xq.q.data() + (i * nb + b) * QK, w.q4),
                                      _mm256_set1_ps(d * xq.dx[i * nb + b]), acc[r][i]);
      }
    }
    for (int r = 0; r < nr; ++r) {
      for (int i = 0; i < MR; ++i) {
        float s = hsum(acc[r][i]);
        if (w.q4) {
          const uint16_t* m = w.m + (n + r) * nb;
          for (int64_t b = 0; b < nb; ++b) s += h2f(m[b]) * xq.sx[i * nb + b];
        }
        y[i * N + n + r] = s;
      }
    }
  }
}
#endif

// Many activation rows: unpack tiles of 4 weight rows into a buffer and run every row against it.
void buffered_rows(const Blocks& w, int64_t t0, int64_t t1, const float* x, int64_t M, int64_t N, float* y) {
  const int64_t K = w.nb * QK;
  std::vector<float> buf(TILE * K);
  float out[TILE];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * TILE, r = std::min(TILE, N - n0);
    for (int64_t i = 0; i < r; ++i) unpack_row(w, n0 + i, buf.data() + i * K);
    for (int64_t i = 0; i < M; ++i) {
      if (r == TILE) {
        dot_rows<TILE>(buf.data(), K, x + i * K, out);
      } else {
        for (int64_t j = 0; j < r; ++j) dot_rows<1>(buf.data() + j * K, K, x + i * K, out + j);
      }
      for (int64_t j = 0; j < r; ++j) y[i * N + n0 + j] = out[j];
    }
  }
}

constexpr int64_t FUSED_MAX_ROWS = 4;

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                     const c10::optional<torch::Tensor>& m, bool a8) {
  const Blocks w = blocks_of(qs, d, m);
  const int64_t K = w.nb * QK, N = w.rows;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) == K,
              "quantized linear: x must be a contiguous float32 [tokens, ", K, "] tensor");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 0) return y;  // a step with no outputs asks the head for nothing
#ifdef PIE_AVX2
  if (M <= FUSED_MAX_ROWS && a8) {
    const QuantRows xq = quantize_rows(xp, M, w.nb);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: fused_rows_a8<1>(w, n0, n1, xq, N, yp); break;
        case 2: fused_rows_a8<2>(w, n0, n1, xq, N, yp); break;
        case 3: fused_rows_a8<3>(w, n0, n1, xq, N, yp); break;
        default: fused_rows_a8<4>(w, n0, n1, xq, N, yp); break;
      }
    });
    return y;
  }
  if (M <= FUSED_MAX_ROWS) {
    std::vector<float> xsum(M * w.nb);  // per row and block: the sum of x, for the minimums' term
    for (int64_t i = 0; i < M * w.nb; ++i) {
      float s = 0.f;
      for (int j = 0; j < QK; ++j) s += xp[i * QK + j];
      xsum[i] = s;
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: fused_rows<1>(w, n0, n1, xp, xsum.data(), N, yp); break;
        case 2: fused_rows<2>(w, n0, n1, xp, xsum.data(), N, yp); break;
        case 3: fused_rows<3>(w, n0, n1, xp, xsum.data(), N, yp); break;
        default: fused_rows<4>(w, n0, n1, xp, xsum.data(), N, yp); break;
      }
    });
    return y;
  }
#endif
  at::parallel_for(0, (N + TILE - 1) / TILE, 1,
                   [&](int64_t t0, int64_t t1) { buffered_rows(w, t0, t1, xp, M, N, yp); });
  return y;
}

// The dequantized rows `index` of a weight: float32 [len(index), K] (embedding lookups, checks).
torch::Tensor rows(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                   const torch::Tensor& index) {
  const Blocks w = blocks_of(qs, d, m);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == torch::kInt64, "rows: index must be a 1-d int64 tensor");
  const auto idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t R = idx.size(0), K = w.nb * QK;
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < w.rows, "rows: index ", ip[i], " is out of range [0, ", w.rows, ")");
  auto out = torch::empty({R, K}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) unpack_row(w, ip[i], op + i * K);
  });
  return out;
}

// RMSNorm as Hugging Face's Llama computes it in fp32: w * (x / sqrt(mean(x^2) + eps)), one pass
// per row. F.rms_norm costs ~35 us a call on a 576-wide decode row here (it converts and
// allocates); at two norms a layer that was a tenth of a quantized decode step.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "rms_norm: x must be a contiguous float32 [rows, hidden] tensor");
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.size(0) == x.size(1),
              "rms_norm: w must be a contiguous float32 [hidden] tensor");
  const int64_t R = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 64, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const float* xr = xp + r * H;
      float ss = 0.f;
      for (int64_t j = 0; j < H; ++j) ss += xr[j] * xr[j];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      for (int64_t j = 0; j < H; ++j) yp[r * H + j] = wp[j] * (xr[j] * inv);
    }
  });
  return y;
}

bool has_avx2() {
#ifdef PIE_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("linear", &linear,
          "y = x @ W.T for a Q4_1 (m given) or Q8_0 (m None) weight W; a8: up to 4 rows of x are quantized "
          "to 8 bits per block of 32 for integer dot products (llama.cpp's decode path)",
          pybind11::arg("x"), pybind11::arg("qs"), pybind11::arg("d"), pybind11::arg("m"), pybind11::arg("a8"));
  mod.def("rows", &rows, "dequantized rows of a Q4_1 or Q8_0 weight",
          pybind11::arg("qs"), pybind11::arg("d"), pybind11::arg("m"), pybind11::arg("index"));
  mod.def("rms_norm", &rms_norm, "Llama's RMSNorm over the rows of an fp32 matrix",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("eps"));
  mod.def("has_avx2", &has_avx2, "whether this build uses the AVX2/FMA paths");
}
