// The recurrent GEMMs with a bfloat16 recurrent weight, on AVX512-BF16 dot products
// (vdpbf16ps): gh[B, N] = bf16(h) @ W^T, products of bfloat16 pairs summed in float32.
// Included by kernels.cpp after TiledF (in its anonymous namespace; it uses TiledF,
// ScratchBuffer, Slices, run_slices, g_tiled). Same interface as TiledF for the steps of
// kernels_impl.h (rows_of, gemm_panel, the panel geometry), so the time loops, splits and
// cell math are the float32 ones: only the GEMM's operands are bfloat16.
//
// Why: torch.nn's bfloat16 LSTM (oneDNN) computes its GEMMs on these dot products, which
// run at twice the float32 FMA rate here (Zen 4, one core: 219 against 117 GFLOP/s with
// 256-bit vectors); float32 compute of a bfloat16 module reached 0.49-0.69x of it in
// inference. A bfloat16 weight is exact in this kernel; h is rounded to bfloat16 (round to
// nearest even) before each step's product, as in torch.nn's bfloat16 modules, whose h is
// bfloat16. The backwards' recurrent GEMM (DhGemm in kernels_impl.h) runs on it too, with
// W_hh^T packed and the pre-activation gradients rounded to bfloat16.
//
// Layout: the panels of TiledF (8*V output columns, gates interleaved per 8 units), with
// k in pairs: for pair kk, lane l of vector v holds one 32-bit word with the weight's
// entries k = 2kk (low half) and 2kk+1 (high half) of its column, zero-padded past K
// (odd K) and past the last unit. A's rows are converted once per step (rows_of) into the
// same pairs, so the micro-kernel broadcasts one 32-bit word per row and pair.
#define FRNN_BF16_TARGET "avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16"

struct TiledBF : PanelGeometry {
  static constexpr int64_t KC2 = 128;  // pairs per k-block: a 4-vector panel block is 16 KB (L1)
  static bool supported() {
    static const bool yes = has_avx512() && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512bf16");
    return yes;
  }
  static bool use(int64_t steps, int64_t /*weights*/) {  // (from kMinSteps only, as the module's choice)
    return steps >= TiledF::kMinSteps && g_tiled.load(std::memory_order_relaxed) && supported();
  }
  static int64_t block_rows(int) { return TiledF::zmm() ? 8 : 4; }  // (as TiledF's)

  int64_t K2, lda2;  // (k pairs; words between A's rows)
  bool pairs;  // GRU's panels packed in pairs on zmm vectors (as TiledF::pairs)
  std::unique_ptr<ScratchBuffer> P;  // the packed panels: npanel * K2 * 8V words
  std::unique_ptr<ScratchBuffer> A;  // per unit slice: B rows of lda2 words (h in bf16 pairs)
  int64_t B;

  // value(col, k) = W[col * sc + k * sk] in bfloat16 bits, col = gate * units + unit: the
  // forward's W_hh (sc = K, sk = 1) or the backward's W_hh^T (sc = 1, sk = units); B: the
  // batch (A's rows); sl: the unit slices (packed in parallel; an A buffer per thread of a split).
  TiledBF(const uint16_t* W, int64_t sc, int64_t sk, int ng_, int64_t units_, int64_t K_, int64_t B_,
          const Slices& sl)
      : PanelGeometry(ng_, units_, K_), K2((K_ + 1) / 2), lda2(K2 + 16), pairs(ng_ == 3 && TiledF::zmm()),
        P(new ScratchBuffer(npanel * K2 * 8 * V)), A(new ScratchBuffer(sl.threads * B_ * lda2 + 16)), B(B_) {
    pack_slices(*this, W, sc, sk, sl);
  }
  int64_t ldc() const { return npanel * 8 * V + 16; }  // as TiledF's
  uint32_t* panels() const { return reinterpret_cast<uint32_t*>(P->get()); }

  // 8 contiguous columns at w (rows sk apart), pair kk: rows 2kk and 2kk + 1 (zero past K)
  // interleaved into 8 words at o.
  void interleave8(const uint16_t* w, int64_t sk, int64_t kk, uint32_t* o) const {
    const int64_t k0 = 2 * kk, k1 = k0 + 1;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k0 * sk));
    const __m128i b = k1 < K ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k1 * sk)) : _mm_setzero_si128();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(a, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 4), _mm_unpackhi_epi16(a, b));
  }
  static uint32_t pair(const uint16_t* row, int64_t k, int64_t K) {
    return uint32_t(row[k]) | (k + 1 < K ? uint32_t(row[k + 1]) << 16 : 0u);
  }
  void pack(const uint16_t* W, int64_t sc, int64_t sk, int64_t p) {
    const int64_t up = panel_units(ng);
    int64_t start, ld;  // (ld: words between its k pairs)
    TiledF::packed_at(pairs, npanel, K2, 8 * V, p, start, ld);
    uint32_t* out = panels() + start;
    if (sk != 1 && sc == 1 && full_panel(p)) {  // columns contiguous: row pair by row pair (see TiledF::pack)
      for (int64_t kk = 0; kk < K2; ++kk)
        for (int v = 0; v < V; ++v) interleave8(W + column(v, p), sk, kk, out + kk * ld + v * 8);
      return;
    }
    for (int v = 0; v < V; ++v) {
      const int gate = ng == 1 ? 0 : v;
      const int64_t u0 = p * up + (ng == 1 ? v * 8 : 0);
      if (sk != 1) {  // columns contiguous (sc = 1, the backward's W_hh^T): interleave rows k, k+1
        const uint16_t* w = W + (gate * units + u0) * sc;
        for (int64_t kk = 0; kk < K2; ++kk) {
          const int64_t k0 = 2 * kk, k1 = k0 + 1;
          uint32_t* o = out + kk * ld + v * 8;
          if (sc == 1 && u0 + 8 <= units) {
            interleave8(w, sk, kk, o);
          } else {
            for (int l = 0; l < 8; ++l)
              o[l] = u0 + l < units ? uint32_t(w[l * sc + k0 * sk]) | (k1 < K ? uint32_t(w[l * sc + k1 * sk]) << 16 : 0u)
                                    : 0u;
          }
        }
        continue;
      }
      const uint16_t* row[8];
      for (int l = 0; l < 8; ++l) row[l] = u0 + l < units ? W + (gate * units + u0 + l) * sc : nullptr;
      int64_t kk = 0;
      // 8 columns x 8 pairs at a time: an 8x8 transpose of 32-bit words.
      for (; 2 * (kk + 8) <= K; kk += 8) {
        __m256 r[8];
        for (int l = 0; l < 8; ++l)
          r[l] = row[l] ? _mm256_loadu_ps(reinterpret_cast<const float*>(row[l] + 2 * kk)) : _mm256_setzero_ps();
        TiledF::transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(reinterpret_cast<float*>(out + (kk + j) * ld + v * 8), r[j]);
      }
      for (; kk < K2; ++kk)
        for (int l = 0; l < 8; ++l) out[kk * ld + v * 8 + l] = row[l] ? pair(row[l], 2 * kk, K) : 0u;
    }
  }

  // Rows [0, nr) of A (float32, leading dimension lda) in bfloat16 pairs, in slice k's
  // buffer: the A operand of this step's gemm_panel calls.
  struct ARows {
    const uint32_t* p;
    int64_t ld;
  };
  ARows rows_of(int k, const float* a, int64_t lda, int64_t nr) {
    uint32_t* out = reinterpret_cast<uint32_t*>(A->get()) + k * B * lda2;
    to_bf16(a, lda, nr, K, out, lda2);
    return {out, lda2};
  }
  __attribute__((target(FRNN_BF16_TARGET), noinline)) static void to_bf16(const float* a, int64_t lda, int64_t nr,
                                                                            int64_t K, uint32_t* out, int64_t ldo) {
    for (int64_t r = 0; r < nr; ++r) {
      const float* src = a + r * lda;
      uint16_t* dst = reinterpret_cast<uint16_t*>(out + r * ldo);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
      const int64_t n = (K + 1) / 2 * 2 - k;  // the rest, with the odd K's zero pad
      if (n > 0) {
        const __mmask16 in = __mmask16((1u << (K - k)) - 1), all = __mmask16((1u << n) - 1);
        _mm256_mask_storeu_epi16(dst + k, all, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(in, src + k)));
      }
    }
  }

  // C[R rows, 8VV] (+)= A[R rows, K2 pairs] @ the panel block Pn, the accumulators in
  // registers (R x VV of them, R broadcasts and one weight vector: <= 25 of the 32).
  // `pf`: npf (<= K2) cache lines to prefetch, one per pair (see rows()). `init` (if not
  // null and not acc): the accumulators start from it (8*VV values, a bias).
  template <int VV, int R>
  __attribute__((target(FRNN_BF16_TARGET), noinline)) static void kernel(int64_t K2, const uint32_t* A, int64_t lda,
                                                                           const uint32_t* Pn, float* C, int64_t ldc,
                                                                           bool acc, const char* pf, int64_t npf,
                                                                           const float* init) {
    __m256 c[R][VV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v)
        c[r][v] = acc    ? _mm256_loadu_ps(C + r * ldc + v * 8)
                  : init ? _mm256_loadu_ps(init + v * 8)
                         : _mm256_setzero_ps();
    int64_t k = 0;
    if constexpr (R == 1) {
      // One row (a GEMV): a second set of accumulators for odd pairs hides the latency.
      __m256 d[VV];
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) d[v] = _mm256_setzero_ps();
      for (; k + 2 <= K2; k += 2) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        if (k + 1 < npf) _mm_prefetch(pf + 64 * (k + 1), _MM_HINT_T0);
        const __m256i* w = reinterpret_cast<const __m256i*>(Pn + k * (8 * VV));
        const __m256bh a0 = (__m256bh)_mm256_set1_epi32(int(A[k])), a1 = (__m256bh)_mm256_set1_epi32(int(A[k + 1]));
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) {
          c[0][v] = _mm256_dpbf16_ps(c[0][v], a0, (__m256bh)_mm256_loadu_si256(w + v));
          d[v] = _mm256_dpbf16_ps(d[v], a1, (__m256bh)_mm256_loadu_si256(w + VV + v));
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) c[0][v] = _mm256_add_ps(c[0][v], d[v]);
    }
    for (; k < K2; ++k) {
      if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
      const __m256i* w = reinterpret_cast<const __m256i*>(Pn + k * (8 * VV));
      __m256bh a[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r] = (__m256bh)_mm256_set1_epi32(int(A[r * lda + k]));
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) {
        const __m256bh wv = (__m256bh)_mm256_loadu_si256(w + v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) c[r][v] = _mm256_dpbf16_ps(c[r][v], a[r], wv);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) _mm256_storeu_ps(C + r * ldc + v * 8, c[r][v]);
  }

  // The kernel on 16-float (zmm) vectors where TiledF's is (tiled mode 3, TiledF::kernel512):
  // a 4-vector panel's 32 columns are 2 vectors per row (a 3-vector panel's: one, and an
  // 8-float vector), 2R accumulators. The same dot products per column in the same order:
  // bit-identical results.
  template <int VV, int R>
  __attribute__((target(FRNN_BF16_TARGET), noinline)) static void kernel512(int64_t K2, const uint32_t* A, int64_t lda,
                                                                              const uint32_t* Pn, float* C, int64_t ldc,
                                                                              bool acc, const char* pf, int64_t npf,
                                                                              const float* init) {
    if constexpr (VV == 6) {  // a pair of 3-vector panels (pairs): 3 vectors per row
      __m512 c[R][3];
      TiledF::load512x3<R>(c, C, ldc, acc, init);
      for (int64_t k = 0; k < K2; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const uint32_t* w = Pn + k * 48;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16),
                       w2 = (__m512bh)_mm512_loadu_si512(w + 32);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[r * lda + k]));
          c[r][0] = _mm512_dpbf16_ps(c[r][0], a, w0);
          c[r][1] = _mm512_dpbf16_ps(c[r][1], a, w1);
          c[r][2] = _mm512_dpbf16_ps(c[r][2], a, w2);
        }
      }
      TiledF::store512x3<R>(c, C, ldc);
    } else {
      TiledF::Hi512<VV> d[R];
      __m512 c[R];
      TiledF::load512<VV, R>(c, d, C, ldc, acc, init);
      for (int64_t k = 0; k < K2; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const uint32_t* w = Pn + k * (8 * VV);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
        if constexpr (VV == 4) {
          const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 16);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[r * lda + k]));
            c[r] = _mm512_dpbf16_ps(c[r], a, w0);
            d[r] = _mm512_dpbf16_ps(d[r], a, w1);
          }
        } else {
          const __m256bh w1 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const int a = int(A[r * lda + k]);
            c[r] = _mm512_dpbf16_ps(c[r], (__m512bh)_mm512_set1_epi32(a), w0);
            d[r] = _mm256_dpbf16_ps(d[r], (__m256bh)_mm256_set1_epi32(a), w1);
          }
        }
      }
      TiledF::store512<VV, R>(c, d, C, ldc);
    }
  }

  // C[B, 8VV] (+)= A[B, K2] @ the panel block Pn in blocks of 4 rows, or kernel512's 8
  // (TiledF::row_blocks: the tail, and the prefetch of `next`).
  template <int VV>
  static void rows(int64_t B, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* Pn, float* C, int64_t ldc,
                   bool acc, const uint32_t* next, int64_t next_bytes, const float* init = nullptr) {
    if (TiledF::zmm()) {
      TiledF::row_blocks<8>(B, K2, next, next_bytes, [&](auto r_const, int64_t b, const char* pf, int64_t npf) {
        constexpr int R = decltype(r_const)::value;
        if constexpr (R > 1) kernel512<VV, R>(K2, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
        else kernel<VV, R>(K2, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
      });
      return;
    }
    TiledF::row_blocks<4>(B, K2, next, next_bytes, [&](auto r_const, int64_t b, const char* pf, int64_t npf) {
      kernel<VV, decltype(r_const)::value>(K2, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
    });
  }

  bool prefetches() const { return npanel * K2 * 8 * V * 4 >= TiledF::kPrefetchMinBytes; }  // (as TiledF's)
  // TiledF::gemm_gates: the step's panels [p0, p1) into the gate buffer.
  void gemm_gates(int64_t p0, int64_t p1, int64_t Bn, const uint32_t* a, int64_t lda, float* C, int64_t ldc,
                  bool reversed) const {
    for_spans(pairs, npanel, p0, p1, reversed && !prefetches(),
                      [&](int64_t q, int64_t n) { gemm_span(q, n, Bn, a, lda, C, ldc, false, false, nullptr); });
  }
  // Panel p's columns of C (+)= A @ W^T for Bn rows of A (from rows_of), k-blocked, as
  // TiledF::gemm_panel: C the padded gate buffer [Bn, ldc()], or with `exact` a [Bn, units]
  // matrix (leading dimension ldc, last panel possibly partial) through the contiguous
  // scratch `tmp` (Bn x 8V floats).
  void gemm_panel(int64_t p, int64_t Bn, const uint32_t* a, int64_t lda, float* C, int64_t ldc, bool acc, bool exact,
                  float* tmp) const {
    gemm_span(p, 1, Bn, a, lda, C, ldc, acc, exact, tmp);
  }
  // gemm_panel on `np` panels from p at once: 2 for a pair (not `exact`).
  void gemm_span(int64_t p, int64_t np, int64_t Bn, const uint32_t* a, int64_t lda, float* C, int64_t ldc, bool acc,
                 bool exact, float* tmp) const {
    const int64_t w = 8 * V * np;
    const int64_t col = p * panel_units(ng), valid = exact ? std::min<int64_t>(w, units - col) : w;
    float* Ct = exact ? tmp : C + p * 8 * V;
    const int64_t ldt = exact ? w : ldc;
    if (exact && acc) TiledF::to_tmp(Bn, C, ldc, col, valid, tmp, w);
    const uint32_t* Pn = panels() + p * K2 * 8 * V;
    if (K2 == 0 && !acc)
      for (int64_t b = 0; b < Bn; ++b) std::fill(Ct + b * ldt, Ct + b * ldt + w, 0.f);
    const bool pf = Bn >= 2 && prefetches();
    const uint32_t* end = panels() + npanel * K2 * 8 * V;
    for (int64_t k0 = 0; k0 < K2; k0 += KC2) {
      const int64_t kc = std::min(KC2, K2 - k0);
      const bool ac = acc || k0 > 0;
      const uint32_t* nxt = Pn + (k0 + kc) * w;
      const uint32_t* next = pf && nxt < end ? nxt : nullptr;
      const int64_t nbytes = std::min<int64_t>(KC2 * w, end - nxt) * 4;
      if (V == 4) rows<4>(Bn, kc, a + k0, lda, Pn + k0 * w, Ct, ldt, ac, next, nbytes);
      else if (np == 2) rows<6>(Bn, kc, a + k0, lda, Pn + k0 * w, Ct, ldt, ac, next, nbytes);
      else rows<3>(Bn, kc, a + k0, lda, Pn + k0 * w, Ct, ldt, ac, next, nbytes);
    }
    if (exact) TiledF::from_tmp(Bn, tmp, C, ldc, col, valid, w);
  }
};

// C[M, N] = A[M, K] @ W[N, K]^T (+ bias[N] if not null): bfloat16 A and W (raw bits,
// row-major), float32 C (contiguous). The input projection of the bfloat16 inference path
// (register.cpp, projection_bf16): gx in float32, not rounded to bfloat16 as F.linear's
// bfloat16 output would be, and no pass to cast it. W is packed into TiledBF's 32-column
// panels; A's rows are already bfloat16 pairs when K is even (else copied with a zero
// pad). Threads take blocks of MC rows x PG panels; in a block, each panel runs over all K
// (A's block, MC x K, stays in L2; a panel's k-block of 16 KB in L1).
inline void gemm_bf16_panels(int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* W, const float* bias,
                      float* C) {
  constexpr int64_t MC = 96, PG = 8;
  if (M == 0 || N == 0) return;
  const Slices sl = make_slices(N, M * K, TiledBF::panel_units(1));
  const TiledBF tw(W, K, 1, 1, N, K, 0, sl);
  const int64_t K2 = tw.K2, w = 32;
  Buf<uint32_t> ap(K % 2 ? M * K2 : 0);
  if (K % 2)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k2 = 0; k2 < K2; ++k2) ap[m * K2 + k2] = TiledBF::pair(A + m * K, 2 * k2, K);
  const uint32_t* a = K % 2 ? ap.data() : reinterpret_cast<const uint32_t*>(A);
  // Row blocks of equal height (multiples of 4 rows, <= MC): unequal ones left one thread
  // idle for the last 12% of M = 256-512 (a block of 64 rows after two of 96).
  const int64_t nmb = (M + MC - 1) / MC, mc = ((M + nmb - 1) / nmb + 3) / 4 * 4;
  const int64_t ngroups = (tw.npanel + PG - 1) / PG;
  at::parallel_for(0, nmb * ngroups, 1, [&](int64_t i0, int64_t i1) {
    float tmp[MC * 32], init[32];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = i / ngroups * mc, mr = std::min(mc, M - m0), g = i % ngroups;
      if (mr <= 0) continue;
      for (int64_t p = g * PG; p < std::min(tw.npanel, (g + 1) * PG); ++p) {
        const int64_t col = p * w, valid = std::min(w, N - col);
        const bool direct = valid == w;
        std::fill(init, init + w, 0.f);
        if (bias) std::copy(bias + col, bias + col + valid, init);
        float* Ct = direct ? C + m0 * N + col : tmp;
        const int64_t ldt = direct ? N : w;
        const uint32_t* Pn = tw.panels() + p * K2 * w;
        if (K2 == 0)
          for (int64_t r = 0; r < mr; ++r) std::copy(init, init + w, Ct + r * ldt);
        for (int64_t k0 = 0; k0 < K2; k0 += TiledBF::KC2)
          TiledBF::rows<4>(mr, std::min(TiledBF::KC2, K2 - k0), a + m0 * K2 + k0, K2, Pn + k0 * w, Ct, ldt, k0 > 0,
                           nullptr, 0, init);
        if (!direct)
          for (int64_t r = 0; r < mr; ++r) std::copy(tmp + r * w, tmp + r * w + valid, C + (m0 + r) * N + col);
      }
    }
  });
}
#undef FRNN_BF16_TARGET
