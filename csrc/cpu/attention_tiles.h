// The tile products of the CPU attention kernel (sparse_attention_cpu.cpp), in two versions with
// one interface, and the online softmax they share:
//   LoopTiles    fp32 products in our own register-blocked loops: every dtype and shape, the
//                readable specification.
//   MatrixTiles  bf16 and fp32 products on the micro-kernels PyTorch links through ATen
//                (at::native::cpublas::brgemm: oneDNN on AMX, AVX-512 or AVX2), fp32
//                accumulation: K/V rows are gathered by index straight into the layout the
//                micro-kernel reads (for bf16 the packed VNNI one), and for bf16 the
//                probabilities are rounded to bf16 for the value product, as GPU kernels do.
// A tile object is one thread's state for one work unit of `rows` query rows at a time
//   (row r: absolute position pos[r], or -1 for a padding row beyond the queries):
//   load_query(r, ...)   loads row r's query and resets its softmax state;
//   fold_span(...)       folds n <= span_keys() keys (positions key_pos) into every row, tile by
//                        tile of block_n keys: after each tile, keep_going(the max over real
//                        rows of the tile's mass / the row's total mass) says whether to fold
//                        the next; returns the tiles folded;
//   rows()               the rows' positions, unnormalised output and softmax state.
// A span is one tile for LoopTiles, several for MatrixTiles (one product for all their scores).
#pragma once

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "s2o/layout.h"

namespace s2o::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Clones of the vector loops for AVX-512, AVX2 + FMA and the baseline ISA (results differ between
// clones only by rounding).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S2O_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define S2O_CPU_CLONES
#endif

template <typename scalar_t>
struct Operand {  // strided view of a [B, H, N, D] tensor
  const scalar_t* data;
  int64_t s0, s1, s2, s3;
  explicit Operand(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)),
        s3(t.stride(3)) {}
  const scalar_t* row(int64_t b, int64_t h, int64_t n) const { return data + b * s0 + h * s1 + n * s2; }
};

// Softmax state of a unit's rows.
struct RowState {
  std::vector<float> m, l;   // [rows] running max and mass
  std::vector<float> alpha;  // [rows] rescale of the output for the current tile
  std::vector<float> acc;    // [rows][D] unnormalised output
  std::vector<int64_t> pos;  // [rows] absolute position, or -1 for padding rows
  RowState(int64_t rows, int64_t head_dim)
      : m(rows), l(rows), alpha(rows), acc(rows * head_dim), pos(rows) {}
  void reset(int64_t r, int64_t head_dim) {
    m[r] = kNegInf;
    l[r] = 0.0f;
    std::fill(acc.data() + r * head_dim, acc.data() + (r + 1) * head_dim, 0.0f);
  }
};

// exp(x) for x <= 0 (what the softmax feeds it), NaN kept: Cephes' expf polynomial after a
// round-to-nearest split x = k ln2 + f, written so that the compiler vectorises the loops that
// call it (std::exp does not vectorise); about 1 ulp from the correctly rounded value.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kUnderflow = -87.0f;   // below, exp() is subnormal or 0: return 0
  const float v = x < kUnderflow ? kUnderflow : x;  // (NaN passes)
  const float shifted = v * kLog2e + kRound;
  const float k = shifted - kRound;
  int32_t k_bits;
  std::memcpy(&k_bits, &shifted, sizeof k_bits);
  const float f = (v - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float e = p * f * f + f + 1.0f;
  const int32_t scale_bits = (k_bits - 0x4B400000 + 127) << 23;  // 2^k (k >= -126 here)
  float two_k;
  std::memcpy(&two_k, &scale_bits, sizeof two_k);
  return x < kUnderflow ? 0.0f : e * two_k;
}

// The online-softmax step of one tile for every row: s [rows][ld_s] holds the raw scores of n
// keys, times score_scale; becomes exp(score - frame), the row's new max frame. Keys after the
// row's position are masked when causal_mask. Fills rows.alpha; returns the max over real rows of
// gain / l (NaN rows ignored).
S2O_CPU_CLONES
inline float softmax_tile(float* s, int64_t ld_s, int64_t n, float score_scale, const int64_t* key_pos,
                          bool causal_mask, RowState& rows) {
  const int64_t num_rows = static_cast<int64_t>(rows.pos.size());
  float max_ratio = 0.0f;
  for (int64_t r = 0; r < num_rows; ++r) {
    float* sr = s + r * ld_s;
    const int64_t pos = rows.pos[r];
    if (pos < 0) {  // padding row: contributes nothing
      for (int64_t j = 0; j < n; ++j) sr[j] = 0.0f;
      rows.alpha[r] = 1.0f;
      continue;
    }
    float tile_max = kNegInf;
    if (causal_mask) {
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < n; ++j) {
        const float x = key_pos[j] > pos ? kNegInf : sr[j] * score_scale;
        sr[j] = x;
        tile_max = std::max(tile_max, x);
      }
    } else {
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < n; ++j) {
        const float x = sr[j] * score_scale;
        sr[j] = x;
        tile_max = std::max(tile_max, x);
      }
    }
    const float m_new = std::max(rows.m[r], tile_max);
    const float frame = m_new == kNegInf ? 0.0f : m_new;  // all masked so far: keep exp() finite
    float gain = 0.0f;
#pragma omp simd reduction(+ : gain)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpositive(sr[j] - frame);
      sr[j] = e;
      gain += e;
    }
    rows.alpha[r] = exp_nonpositive(rows.m[r] - frame);
    rows.m[r] = m_new;
    rows.l[r] = rows.l[r] * rows.alpha[r] + gain;
    if (rows.l[r] > 0.0f) max_ratio = std::max(max_ratio, gain / rows.l[r]);
  }
  return max_ratio;
}

// ---- LoopTiles: fp32 products in our own loops ----

constexpr int64_t kRowBlock = 4;   // rows per register block of the score product
constexpr int64_t kColBlock = 16;  // keys per register block (two 8-wide vectors)
constexpr int64_t kAccRows = 2;    // rows per register block of the value product
constexpr int64_t kAccCols = 32;   // head-dim columns per register block (four 8-wide vectors)

// s[r][j] = q[r] . kt[:, j] for r < rows, j < n; q [rows][D], kt [D][ld_kt], s [rows][ld_s].
S2O_CPU_CLONES
inline void tile_scores(const float* q, const float* kt, int64_t rows, int64_t head_dim, int64_t n,
                        int64_t ld_kt, float* s, int64_t ld_s) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
      float acc[kRowBlock][kColBlock] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* kd = kt + d * ld_kt + j0;
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const float qd = r < nr ? q[(r0 + r) * head_dim + d] : 0.0f;
          for (int64_t j = 0; j < kColBlock; ++j) acc[r][j] += qd * kd[j];
        }
      }
      const int64_t nj = std::min(kColBlock, n - j0);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < nj; ++j) s[(r0 + r) * ld_s + j0 + j] = acc[r][j];
    }
  }
}

// acc[r] = acc[r] * alpha[r] + sum_j p[r][j] * v[j] for r < rows; p [rows][ld_p], v [n][D]. A
// block of kAccRows x kAccCols outputs stays in registers over the whole key loop.
S2O_CPU_CLONES
inline void tile_accumulate(const float* p, int64_t ld_p, const float* v, const float* alpha,
                            int64_t rows, int64_t n, int64_t head_dim, float* acc) {
  for (int64_t r0 = 0; r0 < rows; r0 += kAccRows) {
    const int64_t nr = std::min(kAccRows, rows - r0);
    for (int64_t d0 = 0; d0 < head_dim; d0 += kAccCols) {
      const int64_t nd = std::min(kAccCols, head_dim - d0);
      float block[kAccRows][kAccCols] = {};
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < nd; ++d) block[r][d] = acc[(r0 + r) * head_dim + d0 + d] * alpha[r0 + r];
      if (nd == kAccCols) {
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = v + j * head_dim + d0;
          for (int64_t r = 0; r < kAccRows; ++r) {
            const float pj = r < nr ? p[(r0 + r) * ld_p + j] : 0.0f;
            for (int64_t d = 0; d < kAccCols; ++d) block[r][d] += pj * vj[d];
          }
        }
      } else {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t d = 0; d < nd; ++d) block[r][d] += p[(r0 + r) * ld_p + j] * v[j * head_dim + d0 + d];
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < nd; ++d) acc[(r0 + r) * head_dim + d0 + d] = block[r][d];
    }
  }
}

template <typename scalar_t>
class LoopTiles {
 public:
  LoopTiles(int64_t rows, int64_t head_dim, int64_t block_n, float scale)
      : rows_(rows, head_dim), head_dim_(head_dim), block_n_(block_n), scale_(scale),
        kt_ld_(ceil_div(block_n, kColBlock) * kColBlock), q_(rows * head_dim),
        kt_(head_dim * kt_ld_), v_(block_n * head_dim), s_(rows * block_n) {}

  RowState& rows() { return rows_; }

  // Row r's query (src: its first element, stride: between elements), pre-scaled; null: padding.
  void load_query(int64_t r, const scalar_t* src, int64_t stride) {
    rows_.reset(r, head_dim_);
    float* qr = q_.data() + r * head_dim_;
    for (int64_t d = 0; d < head_dim_; ++d)
      qr[d] = src ? static_cast<float>(src[d * stride]) * scale_ : 0.0f;
  }

  int64_t span_keys() const { return block_n_; }

  // One tile: n <= block_n keys.
  template <typename KeepGoing>
  int64_t fold_span(const Operand<scalar_t>& k, const Operand<scalar_t>& v, int64_t b,
                    int64_t kv_head, const int64_t* key_pos, int64_t n, bool causal_mask,
                    const KeepGoing& keep_going) {
    keep_going(fold(k, v, b, kv_head, key_pos, n, causal_mask));
    return 1;
  }

 private:
  float fold(const Operand<scalar_t>& k, const Operand<scalar_t>& v, int64_t b, int64_t kv_head,
             const int64_t* key_pos, int64_t n, bool causal_mask) {
    const int64_t D = head_dim_, num_rows = static_cast<int64_t>(rows_.pos.size());
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* kr = k.row(b, kv_head, key_pos[j]);
      const scalar_t* vr = v.row(b, kv_head, key_pos[j]);
      for (int64_t d = 0; d < D; ++d) {
        kt_[d * kt_ld_ + j] = static_cast<float>(kr[d * k.s3]);
        v_[j * D + d] = static_cast<float>(vr[d * v.s3]);
      }
    }
    tile_scores(q_.data(), kt_.data(), num_rows, D, n, kt_ld_, s_.data(), block_n_);
    const float max_ratio = softmax_tile(s_.data(), block_n_, n, 1.0f, key_pos, causal_mask, rows_);
    tile_accumulate(s_.data(), block_n_, v_.data(), rows_.alpha.data(), num_rows, n, D,
                    rows_.acc.data());
    return max_ratio;
  }

  RowState rows_;
  int64_t head_dim_, block_n_;
  float scale_;
  int64_t kt_ld_;          // block_n rounded up to whole register blocks
  std::vector<float> q_;   // [rows][D], pre-scaled by `scale`
  std::vector<float> kt_;  // [D][kt_ld] current key tile, transposed
  std::vector<float> v_;   // [block_n][D] current value tile
  std::vector<float> s_;   // [rows][block_n] scores, then probabilities
};

// ---- MatrixTiles: bf16 and fp32 products on ATen's micro-kernels ----

// A span of keys is padded to whole groups of kKeyStep keys (for bf16 the micro-kernel's B
// operand is packed as [K / 2][N][2], pairs of consecutive K entries side by side).
constexpr int64_t kKeyStep = 16;
inline int64_t padded_keys(int64_t keys) { return ceil_div(keys, kKeyStep) * kKeyStep; }
// Keys per score product: a product of one 64-key tile runs at a fraction of the micro-kernel's
// speed, so several tiles share one; after a stop, the tiles left in the span cost their score
// product only (their values are not gathered).
constexpr int64_t kSpanKeys = 256;

// Whether ATen's bf16 micro-kernel runs here: oneDNN serves it where the CPU has AVX-512 or AMX
// (at::native::cpublas::could_pack answers only whether the CPU has AMX) and ATen raises where it
// does not. Tried once on a small product with a known answer: a[m][k] = m + k times the
// identity, packed.
inline bool bf16_micro_kernel_works() {
  constexpr int64_t n = kKeyStep;
  std::vector<at::BFloat16> a(n * n), b_packed(n * n, at::BFloat16(0.0f));
  std::vector<float> c(n * n, -1.0f);
  for (int64_t m = 0; m < n; ++m)
    for (int64_t k = 0; k < n; ++k) a[m * n + k] = at::BFloat16(static_cast<float>(m + k));
  for (int64_t k = 0; k < n; ++k) b_packed[(k / 2) * 2 * n + 2 * k + k % 2] = at::BFloat16(1.0f);
  try {
    at::native::cpublas::brgemm(n, n, n, n, n, n, /*add_C=*/false, a.data(), b_packed.data(), c.data());
    at::native::cpublas::brgemm_release();
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t m = 0; m < n; ++m)
    for (int64_t k = 0; k < n; ++k)
      if (c[m * n + k] != static_cast<float>(m + k)) return false;
  return true;
}

// Whether MatrixTiles serves these shapes on this machine: fp32 always (ATen runs its own GEMM
// where oneDNN's micro-kernel does not), bf16 where the micro-kernel works and oneDNN is on
// (torch.backends.mkldnn.enabled = False turns it off for ATen too). S2O_CPU_MATRIX_UNITS=0
// turns MatrixTiles off (then LoopTiles serves every call), e.g. to compare the two.
// The gathers read whole rows: the head dim must be the operands' contiguous one.
inline bool matrix_tiles_available(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value) {
  static const bool enabled = [] {
    const char* env = std::getenv("S2O_CPU_MATRIX_UNITS");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!enabled || query.size(3) % kKeyStep != 0 || key.stride(3) != 1 || value.stride(3) != 1)
    return false;
  if (query.scalar_type() == at::kFloat) return true;
  static const bool bf16_works = bf16_micro_kernel_works();
  return query.scalar_type() == at::kBFloat16 && bf16_works && at::globalContext().userEnabledMkldnn();
}

// dst[j] = src[j] * factor (dst may be src).
S2O_CPU_CLONES
inline void scale_to(const float* src, int64_t n, float factor, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * factor;
}
// The same rounded to bf16, to nearest even (NaN stays NaN: its quiet bit survives).
S2O_CPU_CLONES
inline void scale_to(const float* src, int64_t n, float factor, at::BFloat16* dst) {
  uint16_t* dst_bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    const float x = src[j] * factor;
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    dst_bits[j] = static_cast<uint16_t>(bits >> 16);
  }
}

template <typename scalar_t>
class MatrixTiles {
  // bf16: the micro-kernel's B operand is packed (VNNI), pairs of consecutive K entries side by side
  static constexpr bool kPairs = std::is_same_v<scalar_t, at::BFloat16>;

 public:
  MatrixTiles(int64_t rows, int64_t head_dim, int64_t block_n, float scale)
      : rows_(rows, head_dim), head_dim_(head_dim), block_n_(block_n), scale_(scale),
        span_tiles_(std::max<int64_t>(1, kSpanKeys / block_n)),
        capacity_(padded_keys(span_tiles_ * block_n)), q_(rows * head_dim),
        k_packed_(head_dim * capacity_), v_packed_(capacity_ * head_dim), s_(rows * capacity_),
        p_(rows * capacity_), alphas_(span_tiles_ * rows), zeros_(head_dim, scalar_t(0.0f)) {}

  RowState& rows() { return rows_; }
  int64_t span_keys() const { return span_tiles_ * block_n_; }

  void load_query(int64_t r, const scalar_t* src, int64_t stride) {
    rows_.reset(r, head_dim_);
    scalar_t* qr = q_.data() + r * head_dim_;
    for (int64_t d = 0; d < head_dim_; ++d) qr[d] = src ? src[d * stride] : scalar_t(0.0f);
  }

  // Folds n <= span_keys() keys, tile by tile of block_n keys, into every row: after each tile,
  // keep_going(max ratio of the tile) says whether to fold the next one. Returns the tiles folded.
  template <typename KeepGoing>
  int64_t fold_span(const Operand<scalar_t>& k, const Operand<scalar_t>& v, int64_t b,
                    int64_t kv_head, const int64_t* key_pos, int64_t n, bool causal_mask,
                    const KeepGoing& keep_going) {
    const int64_t D = head_dim_, num_rows = static_cast<int64_t>(rows_.pos.size());
    const int64_t ld = padded_keys(n);
    gather_keys(k, b, kv_head, key_pos, n, ld);
    // s = q k^T over the span (padding keys are zero rows: their scores are 0 and unused)
    at::native::cpublas::brgemm(num_rows, ld, D, D, ld, ld, /*add_C=*/false, q_.data(),
                                k_packed_.data(), s_.data());
    int64_t tiles = 0, keys = 0;
    while (keys < n) {
      const int64_t width = std::min(block_n_, n - keys);
      const float max_ratio =
          softmax_tile(s_.data() + keys, ld, width, scale_, key_pos + keys, causal_mask, rows_);
      std::copy(rows_.alpha.begin(), rows_.alpha.end(), alphas_.begin() + tiles * num_rows);
      ++tiles;
      keys += width;
      if (!keep_going(max_ratio)) break;
    }
    accumulate(v, b, kv_head, key_pos, keys, tiles, ld);
    return tiles;
  }

  // Releases the matrix units' configuration (once per thread, after its last tile).
  ~MatrixTiles() { at::native::cpublas::brgemm_release(kPairs); }

 private:
  // acc = acc * (rescale over the folded tiles) + p v for the first `keys` keys of the span, whose
  // probabilities tile t took in the max frame after tile t: they are brought to the last
  // tile's frame (tile t by the alphas of the tiles after it) on their way into p_.
  void accumulate(const Operand<scalar_t>& v, int64_t b, int64_t kv_head, const int64_t* key_pos,
                  int64_t keys, int64_t tiles, int64_t ld_s) {
    const int64_t D = head_dim_, num_rows = static_cast<int64_t>(rows_.pos.size());
    const int64_t ld = padded_keys(keys);
    for (int64_t r = 0; r < num_rows; ++r) {
      const float* sr = s_.data() + r * ld_s;
      scalar_t* pr = p_.data() + r * ld;
      float factor = 1.0f;
      for (int64_t t = tiles - 1; t >= 0; --t) {
        const int64_t first = t * block_n_, width = std::min(block_n_, keys - first);
        scale_to(sr + first, width, factor, pr + first);
        factor *= alphas_[t * num_rows + r];
      }
      std::fill(pr + keys, pr + ld, scalar_t(0.0f));  // padding keys carry no mass
      float* acc = rows_.acc.data() + r * D;
      if (factor != 1.0f) scale_to(acc, D, factor, acc);
    }
    gather_values(v, b, kv_head, key_pos, keys, ld);
    at::native::cpublas::brgemm(num_rows, D, ld, ld, D, D, /*add_C=*/true, p_.data(),
                                v_packed_.data(), rows_.acc.data());
  }

  // K rows into k_packed_ as [D][ld] for fp32, [D/2][ld][2] for bf16: either way the 32-bit word
  // w of key j's row at word w*ld + j; keys j >= n are zero. In blocks of kKeyStep keys, so that
  // each store fills a run of kKeyStep words (strided single-word stores cost more than the
  // score product).
  void gather_keys(const Operand<scalar_t>& k, int64_t b, int64_t kv_head, const int64_t* key_pos,
                   int64_t n, int64_t ld) {
    const uint32_t* rows[kKeyStep];
    uint32_t* k_words = reinterpret_cast<uint32_t*>(k_packed_.data());
    const uint32_t* zeros = reinterpret_cast<const uint32_t*>(zeros_.data());
    for (int64_t j0 = 0; j0 < ld; j0 += kKeyStep) {
      for (int64_t j = 0; j < kKeyStep; ++j)
        rows[j] = j0 + j < n ? reinterpret_cast<const uint32_t*>(k.row(b, kv_head, key_pos[j0 + j]))
                             : zeros;
      transpose_words(rows, head_dim_ * sizeof(scalar_t) / sizeof(uint32_t), k_words + j0, ld);
    }
  }

  // dst[w * ld + j] = rows[j][w] for j < kKeyStep, w < words.
  S2O_CPU_CLONES
  static void transpose_words(const uint32_t* const* rows, int64_t words, uint32_t* dst, int64_t ld) {
    for (int64_t w = 0; w < words; ++w)
      for (int64_t j = 0; j < kKeyStep; ++j) dst[w * ld + j] = rows[j][w];
  }

  // V rows into v_packed_: [ld][D] for fp32; [ld/2][D][2] for bf16 (keys 2i and 2i+1
  // interleaved). Keys j >= n are zero.
  void gather_values(const Operand<scalar_t>& v, int64_t b, int64_t kv_head, const int64_t* key_pos,
                     int64_t n, int64_t ld) {
    const int64_t D = head_dim_;
    const auto row = [&](int64_t j) { return j < n ? v.row(b, kv_head, key_pos[j]) : zeros_.data(); };
    if constexpr (kPairs) {
      for (int64_t j = 0; j < ld; j += 2)
        interleave(bits(row(j)), bits(row(j + 1)), D, bits(v_packed_.data() + j * D));
    } else {
      for (int64_t j = 0; j < ld; ++j) std::memcpy(v_packed_.data() + j * D, row(j), D * sizeof(scalar_t));
    }
  }

  static const uint16_t* bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
  static uint16_t* bits(at::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

  // dst[2d] = even[d], dst[2d + 1] = odd[d], as 32-bit words (little-endian: even in the low half).
  S2O_CPU_CLONES
  static void interleave(const uint16_t* even, const uint16_t* odd, int64_t n, uint16_t* dst) {
    uint32_t* words = reinterpret_cast<uint32_t*>(dst);
    for (int64_t d = 0; d < n; ++d) words[d] = uint32_t{even[d]} | (uint32_t{odd[d]} << 16);
  }

  RowState rows_;
  int64_t head_dim_, block_n_;
  float scale_;
  int64_t span_tiles_;              // tiles per span
  int64_t capacity_;                // keys of a span, padded to kKeyStep
  std::vector<scalar_t> q_;         // [rows][D] unscaled (scale applies to the scores)
  std::vector<scalar_t> k_packed_;  // see gather_keys
  std::vector<scalar_t> v_packed_;  // see gather_values
  std::vector<float> s_;            // [rows][ld] scores, then probabilities
  std::vector<scalar_t> p_;         // [rows][ld] probabilities in the last tile's frame
  std::vector<float> alphas_;       // [span tiles][rows] each folded tile's rescale
  std::vector<scalar_t> zeros_;     // [D] the padding keys' rows
};

}  // namespace s2o::cpu
