// The float64 recurrent GEMMs on AVX-512: gh[B, N] = h @ W^T on a weight packed once per
// call, as TiledF does for float32. Included by kernels.cpp after TiledF (in its anonymous
// namespace; it uses TiledF's row blocks and scratch helpers, ScratchBuffer, Slices,
// run_slices, g_tiled). Same interface and panel geometry (PanelGeometry) as TiledF (rows_of, gemm_gates,
// gemm_panel; 8 units x V gates per panel, 32 units for ng = 1), so the time loops, splits
// and cell math of kernels_impl.h are unchanged: a panel's 8V doubles of one k are V
// 8-double (zmm) vectors.
//
// Why: float64 ran each step's GEMM on BLAS, and torch's MKL does not use AVX-512 on AMD
// CPUs (its "def" AVX2 kernels) and copies the weight again at every call: on the 2-core
// Zen 5 VM (2026-12-01), LSTM B=8 H=1024 inference spent 36% of its samples in MKL's copy
// (mkl_blas_def_dgemm_copyat_bdz) and 40% in its kernel, and torch.nn's float64 LSTM (MKL
// too) was 1.16-1.18x faster than ours there (two runs).
//
// Only where the CPU has AVX-512 (tiled modes 2 and 3): without it (and in mode 0 or 1)
// float64 stays on BLAS.

struct TiledD : PanelGeometry {
  static constexpr int64_t KC = 64;  // gemm_blocked's k-block: a 4-vector panel block is 16 KB (L1)
  // The recurrent steps' k-block, TiledF::kStepKC's bytes (LSTM B=8 H=1024 inference 1.07-1.11x,
  // others within 1%).
  static constexpr int64_t kStepKC = 256;
  static constexpr int kRows = 6;    // rows per micro-kernel block: 6 x 4 accumulators + 4 weights <= 32 zmm
  static bool use(int64_t steps, int64_t weights) {
    return (steps >= TiledF::kMinSteps || (steps >= 2 && weights <= TiledF::kShortMaxWeights)) && TiledF::wide();
  }
  static int64_t block_rows(int) { return kRows; }

  std::unique_ptr<ScratchBuffer> P;  // the packed panels: npanel * K * 8V doubles

  // value(col, k) = W[col * sc + k * sk], col = gate * units + unit: the forward's W_hh
  // (sc = K, sk = 1) or the backward's W_hh^T (sc = 1, sk = units). Packed in parallel.
  TiledD(const double* W, int64_t sc, int64_t sk, int ng_, int64_t units_, int64_t K_, int64_t /*B*/,
         const Slices& sl)
      : TiledD(ng_, units_, K_) {
    pack_slices(*this, W, sc, sk, sl);
  }
  // Unpacked: the caller packs each panel (pack(); gemm_blocked). (ScratchBuffer counts floats.)
  TiledD(int ng_, int64_t units_, int64_t K_)
      : PanelGeometry(ng_, units_, K_), P(new ScratchBuffer(2 * npanel * K_ * 8 * V + 16)) {}
  double* panels() const { return reinterpret_cast<double*>(P->get()); }
  int64_t ldc() const { return npanel * 8 * V + 8; }  // (one line more: see TiledF::ldc)

  __attribute__((target("avx2,fma,avx512f,avx512vl"))) void pack(const double* W, int64_t sc, int64_t sk, int64_t p) {
    const int64_t up = panel_units(ng), ld = 8 * V;
    double* out = panels() + p * K * ld;
    if (sc == 1 && full_panel(p)) {  // columns contiguous: row by row (see TiledF::pack)
      for (int64_t k = 0; k < K; ++k)
        for (int v = 0; v < V; ++v) _mm512_storeu_pd(out + k * ld + v * 8, _mm512_loadu_pd(W + column(v, p) + k * sk));
      return;
    }
    for (int v = 0; v < V; ++v) {
      const int gate = ng == 1 ? 0 : v;
      const int64_t u0 = p * up + (ng == 1 ? v * 8 : 0);
      int64_t k = 0;
      if (sc == 1 && u0 + 8 <= units) {  // columns contiguous, in a partial panel: a vector per k
        for (; k < K; ++k) _mm512_storeu_pd(out + k * ld + v * 8, _mm512_loadu_pd(W + gate * units + u0 + k * sk));
        continue;
      }
      if (sk == 1) {  // rows contiguous in k (the forward's W_hh, a projection's W): 8 x 8 transposes
        __m512d r[8];
        for (; k + 8 <= K; k += 8) {
          for (int l = 0; l < 8; ++l)
            r[l] = u0 + l < units ? _mm512_loadu_pd(W + (gate * units + u0 + l) * sc + k) : _mm512_setzero_pd();
          transpose8(r);
          for (int j = 0; j < 8; ++j) _mm512_storeu_pd(out + (k + j) * ld + v * 8, r[j]);
        }
      }
      for (; k < K; ++k)
        for (int l = 0; l < 8; ++l)
          out[k * ld + v * 8 + l] = u0 + l < units ? W[(gate * units + u0 + l) * sc + k * sk] : 0.0;
    }
  }
  // r[j][l] <- r[l][j]: pairs of rows interleaved (unpack), then 128-bit lanes gathered.
  __attribute__((target("avx2,fma,avx512f,avx512vl"))) static void transpose8(__m512d (&r)[8]) {
    __m512d t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);      // (a0 b0)(a2 b2)(a4 b4)(a6 b6)
      t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);  // (a1 b1)(a3 b3)(a5 b5)(a7 b7)
    }
    constexpr int kEven = _MM_SHUFFLE(2, 0, 2, 0), kOdd = _MM_SHUFFLE(3, 1, 3, 1);
    for (int h = 0; h < 2; ++h) {  // h = 0: columns 0, 2, 4, 6; h = 1: 1, 3, 5, 7
      const __m512d s0 = _mm512_shuffle_f64x2(t[h], t[2 + h], kEven), s1 = _mm512_shuffle_f64x2(t[4 + h], t[6 + h], kEven);
      const __m512d s2 = _mm512_shuffle_f64x2(t[h], t[2 + h], kOdd), s3 = _mm512_shuffle_f64x2(t[4 + h], t[6 + h], kOdd);
      r[h] = _mm512_shuffle_f64x2(s0, s1, kEven);
      r[4 + h] = _mm512_shuffle_f64x2(s0, s1, kOdd);
      r[2 + h] = _mm512_shuffle_f64x2(s2, s3, kEven);
      r[6 + h] = _mm512_shuffle_f64x2(s2, s3, kOdd);
    }
  }

  struct ARows {
    const double* p;
    int64_t ld;
  };
  ARows rows_of(int, const double* a, int64_t lda, int64_t) const { return {a, lda}; }

  // C[R rows, 8VV] (+)= A[R rows, K] @ the panel block Pn (K x 8VV): R x VV accumulators,
  // VV weight vectors and one broadcast in the 32 zmm registers. One row (a GEMV) keeps a
  // second set of accumulators for odd k, as TiledF::kernel. `pf`/`npf`: see TiledF::rows;
  // `init` (if not null and not acc): the accumulators start from it (a bias).
  template <int VV, int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), noinline)) static void kernel(
      int64_t K, const double* A, int64_t lda, const double* Pn, double* C, int64_t ldc, bool acc, const char* pf,
      int64_t npf, const double* init) {
    __m512d c[R][VV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v)
        c[r][v] = acc ? _mm512_loadu_pd(C + r * ldc + v * 8) : init ? _mm512_loadu_pd(init + v * 8) : _mm512_setzero_pd();
    int64_t k = 0;
    if constexpr (R == 1) {
      __m512d d[VV];
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) d[v] = _mm512_setzero_pd();
      for (; k + 2 <= K; k += 2) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        if (k + 1 < npf) _mm_prefetch(pf + 64 * (k + 1), _MM_HINT_T0);
        const double* w = Pn + k * (8 * VV);
        const __m512d a0 = _mm512_set1_pd(A[k]), a1 = _mm512_set1_pd(A[k + 1]);
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) {
          c[0][v] = _mm512_fmadd_pd(a0, _mm512_loadu_pd(w + v * 8), c[0][v]);
          d[v] = _mm512_fmadd_pd(a1, _mm512_loadu_pd(w + 8 * VV + v * 8), d[v]);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) c[0][v] = _mm512_add_pd(c[0][v], d[v]);
    }
    for (; k < K; ++k) {
      if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
      const double* w = Pn + k * (8 * VV);
      __m512d wv[VV];
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) wv[v] = _mm512_loadu_pd(w + v * 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512d a = _mm512_set1_pd(A[r * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) c[r][v] = _mm512_fmadd_pd(a, wv[v], c[r][v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) _mm512_storeu_pd(C + r * ldc + v * 8, c[r][v]);
  }

  // C[B, 8VV] (+)= A[B, K] @ the panel block Pn in blocks of kRows rows (TiledF::row_blocks:
  // the tail, and the prefetch of `next`).
  template <int VV>
  static void rows(int64_t B, int64_t K, const double* A, int64_t lda, const double* Pn, double* C, int64_t ldc,
                   bool acc, const double* next, int64_t next_bytes, const double* init = nullptr) {
    TiledF::row_blocks<kRows>(B, K, next, next_bytes, [&](auto r_const, int64_t b, const char* pf, int64_t npf) {
      kernel<VV, decltype(r_const)::value>(K, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
    });
  }

  bool prefetches() const { return npanel * K * 8 * V * 8 >= TiledF::kPrefetchMinBytes; }  // (as TiledF's)
  // TiledF::gemm_gates: the step's panels [p0, p1) into the gate buffer.
  void gemm_gates(int64_t p0, int64_t p1, int64_t B, const double* A, int64_t lda, double* C, int64_t ldc,
                  bool reversed) const {
    for_spans(false, npanel, p0, p1, reversed && !prefetches(),
              [&](int64_t q, int64_t) { gemm_panel(q, B, A, lda, C, ldc, false, false, nullptr); });
  }
  // Panel p's columns of C (+)= A @ W^T for B rows, k-blocked, as TiledF::gemm_panel: C the
  // padded gate buffer [B, ldc()], or with `exact` a [B, units] matrix (leading dimension
  // ldc, last panel possibly partial) through the contiguous scratch `tmp` (B x 8V).
  void gemm_panel(int64_t p, int64_t B, const double* A, int64_t lda, double* C, int64_t ldc, bool acc, bool exact,
                  double* tmp) const {
    const int64_t w = 8 * V;
    const int64_t col = p * panel_units(ng), valid = exact ? std::min<int64_t>(w, units - col) : w;
    double* Ct = exact ? tmp : C + p * w;
    const int64_t ldt = exact ? w : ldc;
    if (exact && acc) TiledF::to_tmp(B, C, ldc, col, valid, tmp, w);
    const double* Pn = panels() + p * K * w;
    if (K == 0 && !acc)
      for (int64_t b = 0; b < B; ++b) std::fill(Ct + b * ldt, Ct + b * ldt + w, 0.0);
    const bool pf = B >= 2 && prefetches();
    const double* end = panels() + npanel * K * w;
    for (int64_t k0 = 0; k0 < K; k0 += kStepKC) {
      const int64_t kc = std::min(kStepKC, K - k0);
      const bool ac = acc || k0 > 0;
      const double* nxt = Pn + (k0 + kc) * w;
      const double* next = pf && nxt < end ? nxt : nullptr;
      const int64_t nbytes = std::min<int64_t>(kStepKC * w, end - nxt) * 8;
      if (V == 4) rows<4>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, ac, next, nbytes);
      else rows<3>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, ac, next, nbytes);
    }
    if (exact) TiledF::from_tmp(B, tmp, C, ldc, col, valid, w);
  }
};
