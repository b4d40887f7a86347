// Kernel bodies, included twice by kernels.cpp: once compiled for AVX2+FMA and once
// for the baseline ISA (runtime dispatch). Helpers (Slices, run_slices, gemm_nt,
// gemm_nn, ...) come from kernels.cpp. No include guard on purpose.
//
// The time loop (run_steps in kernels.cpp) is shared between threads by hidden units --
// per time step, one parallel region per GEMM: each thread owns a slice of hidden units
// (all gates of those units) and computes its part of the recurrent GEMM, then the
// cell's pointwise math on it while it is in cache (L2) -- or, where that is as fast
// (make_split), by batch rows: each thread runs the whole loop for its rows, with no
// barrier between steps. Each kernel writes its step once, for a range of units and a
// range of rows. float32 on AVX2 and float64 on AVX-512 (Tiled: TiledF, TiledD, see
// kernels.cpp) pack the recurrent weight once per call (sequences of >= 8 steps) and run
// their own register-blocked micro-kernel, panel by panel; otherwise a single-threaded
// BLAS call per slice (or per thread's rows, on the unpacked weight). Nothing is allocated
// inside the time loop.

// ----------------------------------------------------------------------------- forward
template <typename T, typename TW = Tiled<T>, typename WT = T>
void lstm_forward(const T* gx, const T* h0, const T* c0, const WT* w_hh_, const T* w_hr,
                  int64_t H, int64_t P, const Seq& sq,
                  T* y, T* h_n, T* c_n, T* gates, T* cells) {
  const int64_t B = sq.B, TT = sq.T, G = 4 * H;
  const bool proj = w_hr != nullptr;
  const bool tiled = TW::use(TT, G * P);
  const T* w_hh = same_type<T>(w_hh_);  // null for a bfloat16 weight (TiledBF: always tiled)
  const Slices sl = make_slices(H, B * 4 * P, TW::panel_units(4));
  const Slices slp = make_slices(P, B * H);
  std::unique_ptr<TW> tw(tiled ? new TW(w_hh_, P, 1, 4, H, P, B, sl) : nullptr);
  const Split sp = make_split(sl, B, TW::block_rows(4), G * P * int64_t(sizeof(WT)) + P * H * proj * int64_t(sizeof(T)),
                              tiled, TT, &sq);
  const GateWeights<T> w(w_hh, 4, H, P, sl, tiled || sp.by_rows() ? 0 : TT);
  const int64_t ldg = tiled ? tw->ldc() : G;
  Buf<T> gh(B * ldg), ha(B * P), hb(B * P), c(B * H), hr(proj ? B * H : 0);
  SavedRows<T> gates_s(gates, B, G, sp.n()), cells_s(cells, B, H, sp.n());  // null in inference: scratch rows
  std::copy(h0, h0 + B * P, ha.data());
  std::copy(c0, c0 + B * H, c.data());
  PingPong<T> st{ha.data(), hb.data()};
  const FirstStep first(h0, B * P);
  // Cell math of slice k, row b, units [j0, j0+nu), at step s; gate q's pre-activation at a[q*as + u].
  auto cell = [&](int k, int64_t s, int64_t b, int64_t j0, int64_t nu, const T* a, int64_t as, const T* hcur,
                  T* hnext) {
        const int64_t L = sq.len(b);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const T* x = gx + (t * B + b) * G + j0;
          T* gt = gates_s.at(t, b, k) + j0;
          T* ct = cells_s.at(t, b, k) + j0;
          T* cb = c.data() + b * H + j0;
          T* out = proj ? hr.data() + b * H + j0 : hnext + b * P + j0;
          T* yt = y + (t * B + b) * P + j0;
#pragma omp simd
          for (int64_t u = 0; u < nu; ++u) {
            T i, f, g, o, cc, hh;
            lstm_forward_unit(x[u] + a[u], x[H + u] + a[as + u], x[2 * H + u] + a[2 * as + u],
                              x[3 * H + u] + a[3 * as + u], cb[u], i, f, g, o, cc, hh);
            gt[u] = i; gt[H + u] = f; gt[2 * H + u] = g; gt[3 * H + u] = o;
            ct[u] = cc; cb[u] = cc; out[u] = hh;
          }
          if (!proj) std::copy(out, out + nu, yt);
        } else {
          T* gt = gates_s.at(s, b, k) + j0;
          for (int q = 0; q < 4; ++q) std::fill(gt + q * H, gt + q * H + nu, T(0));
          std::fill(cells_s.at(s, b, k) + j0, cells_s.at(s, b, k) + j0 + nu, T(0));
          if (!proj) {
            std::fill(y + (s * B + b) * P + j0, y + (s * B + b) * P + j0 + nu, T(0));
            std::copy(hcur + b * P + j0, hcur + b * P + j0 + nu, hnext + b * P + j0);
          }
        }
  };
  // With projection, after step s's cell math: h_t = hr @ W_hr^T (columns [p0, p0 + np) of
  // rows [b0, b1)), and y.
  auto project = [&](int64_t s, int64_t p0, int64_t np, int64_t b0, int64_t b1, const T* hcur, T* hnext) {
    gemm_nt<T>(sq.rows(s, b0, b1), np, H, hr.data() + b0 * H, H, w_hr + p0 * H, H, hnext + b0 * P + p0, P, T(0));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = sq.len(b);
      if (s < L) {
        const int64_t t = sq.reverse ? L - 1 - s : s;
        std::copy(hnext + b * P + p0, hnext + b * P + p0 + np, y + (t * B + b) * P + p0);
      } else {
        std::copy(hcur + b * P + p0, hcur + b * P + p0 + np, hnext + b * P + p0);
        std::fill(y + (s * B + b) * P + p0, y + (s * B + b) * P + p0 + np, T(0));
      }
    }
  };
  // Step s for units [j0, j1) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t s, int64_t j0, int64_t j1, int64_t b0, int64_t b1, PingPong<T>& hs) {
      const T* hcur = hs.cur;
      T* hnext = hs.next;
      const int64_t nr = first.gemm_rows(s, sq.rows(s, b0, b1));  // (rows that ended: skipped)
      if (tiled) {
        // The slice's GEMM panel by panel, then its cell math row by row (sequential in
        // gx/gates/y; the slice's gate buffer is in L2, or a chunk of it in L1: see
        // cell_chunk_rows), 8 units (one panel) at a time.
        const int64_t p0 = tw->first_panel(j0), p1 = tw->end_panel(j1);
        const auto A = tw->rows_of(k, hcur + b0 * P, P, nr);
        const int64_t chunk = cell_chunk_rows(sp.by_rows() && std::is_same_v<T, float> && std::is_same_v<WT, float>,
                                              gates == nullptr, b1 - b0, (p1 - p0) * 32 * sizeof(T),
                                              TW::block_rows(4));
        gemm_then_cells(
            b0, b1, nr, chunk,
            [&](int64_t c0, int64_t n, int64_t i) {
              tw->gemm_gates(p0, p1, n, A.p + (c0 - b0) * A.ld, A.ld, gh.data() + c0 * ldg, ldg, (s + i) & 1);
            },
            [&](int64_t b) {
              const T* a = gh.data() + first.row(s, b0, b) * ldg;
              int64_t p = p0;
              const int64_t L = sq.len(b);
              if (s < L) {  // float32: the row's full panels at once (lstm_cells8)
                const int64_t t = sq.reverse ? L - 1 - s : s;
                p = lstm_cells8(gx + (t * B + b) * G, H, a, c.data() + b * H, gates_s.at(t, b, k),
                                cells_s.at(t, b, k), proj ? hr.data() + b * H : hnext + b * P,
                                proj ? nullptr : y + (t * B + b) * P, p, std::min(p1, H / 8));
              }
              for (; p < p1; ++p) cell(k, s, b, p * 8, std::min<int64_t>(8, H - p * 8), a + p * 32, 8, hcur, hnext);
            });
        if (proj && sp.by_rows()) project(s, 0, P, b0, b1, hcur, hnext);  // (by units: after the step)
      } else if (sp.by_rows()) {  // BLAS on the unpacked (gate-major) weight: gate q of unit u at q*H + u
        gemm_nt<T>(nr, G, P, hcur + b0 * P, P, w_hh, P, gh.data() + b0 * G, G, T(0));
        for (int64_t b = b0; b < b1; ++b) cell(k, s, b, 0, H, gh.data() + first.row(s, b0, b) * G, H, hcur, hnext);
        if (proj) project(s, 0, P, b0, b1, hcur, hnext);
      } else {  // BLAS by units: all rows, the slice's packed rows
        w.gemm(k, nr, hcur, gh.data());
        for (int64_t b = 0; b < B; ++b)
          cell(k, s, b, j0, j1 - j0, gh.data() + first.row(s, 0, b) * G + 4 * j0, j1 - j0, hcur, hnext);
      }
  };
  // By units, the projection is a parallel region of its own after each step, over P's columns.
  auto project_step = [&](int64_t s, PingPong<T>& hs) {
    if (proj)
      run_slices(slp, [&](int k) { project(s, slp.lo(k), slp.hi(k) - slp.lo(k), 0, B, hs.cur, hs.next); });
  };
  run_steps(sp, TT, H, B, st, step, NoHook(), project_step);
  std::copy(st.cur, st.cur + B * P, h_n);
  std::copy(c.data(), c.data() + B * H, c_n);
}

template <typename T, typename TW = Tiled<T>, typename WT = T>
void gru_forward(const T* gx, const T* h0, const WT* w_hh_, const T* b_hh, int64_t H, const Seq& sq,
                 T* y, T* h_n, T* gates, T* hn) {
  const int64_t B = sq.B, TT = sq.T, G = 3 * H;
  const bool tiled = TW::use(TT, G * H);
  const T* w_hh = same_type<T>(w_hh_);
  const Slices sl = make_slices(H, B * 3 * H, TW::panel_units(3));
  std::unique_ptr<TW> tw(tiled ? new TW(w_hh_, H, 1, 3, H, H, B, sl) : nullptr);
  const Split sp = make_split(sl, B, TW::block_rows(3), G * H * int64_t(sizeof(WT)), tiled, TT, &sq);
  const GateWeights<T> w(w_hh, 3, H, H, sl, tiled || sp.by_rows() ? 0 : TT);
  const int64_t ldg = tiled ? tw->ldc() : G;
  Buf<T> bz(b_hh ? 0 : G, T(0)), gh(B * ldg), ha(B * H), hb(B * H);
  const T* bias = b_hh ? b_hh : bz.data();
  SavedRows<T> gates_s(gates, B, G, sp.n()), hn_s(hn, B, H, sp.n());  // null in inference: scratch rows
  std::copy(h0, h0 + B * H, ha.data());
  PingPong<T> st{ha.data(), hb.data()};
  const FirstStep first(h0, B * H);
  auto cell = [&](int k, int64_t s, int64_t b, int64_t j0, int64_t nu, const T* a, int64_t as, const T* hcur,
                  T* hnext) {
        const T* bb = bias + j0;
        const int64_t L = sq.len(b);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const T* x = gx + (t * B + b) * G + j0;
          const T* hp = hcur + b * H + j0;
          T* gt = gates_s.at(t, b, k) + j0;
          T* hs = hn_s.at(t, b, k) + j0;
          T* out = hnext + b * H + j0;
#pragma omp simd
          for (int64_t u = 0; u < nu; ++u) {
            T r, z, n, hh;
            const T an = a[2 * as + u] + bb[2 * H + u];
            gru_forward_unit(x[u], x[H + u], x[2 * H + u], a[u] + bb[u], a[as + u] + bb[H + u], an, hp[u],
                             r, z, n, hh);
            gt[u] = r; gt[H + u] = z; gt[2 * H + u] = n;
            hs[u] = an; out[u] = hh;
          }
          std::copy(out, out + nu, y + (t * B + b) * H + j0);
        } else {
          T* gt = gates_s.at(s, b, k) + j0;
          for (int q = 0; q < 3; ++q) std::fill(gt + q * H, gt + q * H + nu, T(0));
          std::fill(hn_s.at(s, b, k) + j0, hn_s.at(s, b, k) + j0 + nu, T(0));
          std::fill(y + (s * B + b) * H + j0, y + (s * B + b) * H + j0 + nu, T(0));
          std::copy(hcur + b * H + j0, hcur + b * H + j0 + nu, hnext + b * H + j0);
        }
  };
  // Step s for units [j0, j1) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t s, int64_t j0, int64_t j1, int64_t b0, int64_t b1, PingPong<T>& hs) {
      const T* hcur = hs.cur;
      T* hnext = hs.next;
      const int64_t nr = first.gemm_rows(s, sq.rows(s, b0, b1));  // (rows that ended: skipped)
      if (tiled) {
        // The slice's GEMM panel by panel, then its cell math row by row (sequential in
        // gx/gates/y; the slice's gate buffer is in L2), 8 units (one panel) at a time.
        const int64_t p0 = tw->first_panel(j0), p1 = tw->end_panel(j1);
        const auto A = tw->rows_of(k, hcur + b0 * H, H, nr);
        tw->gemm_gates(p0, p1, nr, A.p, A.ld, gh.data() + b0 * ldg, ldg, s & 1);
        for (int64_t b = b0; b < b1; ++b) {
          const T* a = gh.data() + first.row(s, b0, b) * ldg;
          int64_t p = p0;
          const int64_t L = sq.len(b);
          if (s < L) {  // float32: the row's full panels at once (gru_cells8)
            const int64_t t = sq.reverse ? L - 1 - s : s;
            p = gru_cells8(gx + (t * B + b) * G, H, a, bias, hcur + b * H, gates_s.at(t, b, k), hn_s.at(t, b, k),
                           hnext + b * H, y + (t * B + b) * H, p, std::min(p1, H / 8));
          }
          for (; p < p1; ++p) cell(k, s, b, p * 8, std::min<int64_t>(8, H - p * 8), a + p * 24, 8, hcur, hnext);
        }
      } else if (sp.by_rows()) {  // BLAS on the unpacked (gate-major) weight
        gemm_nt<T>(nr, G, H, hcur + b0 * H, H, w_hh, H, gh.data() + b0 * G, G, T(0));
        for (int64_t b = b0; b < b1; ++b) cell(k, s, b, 0, H, gh.data() + first.row(s, b0, b) * G, H, hcur, hnext);
      } else {  // BLAS by units: all rows, the slice's packed rows
        w.gemm(k, nr, hcur, gh.data());
        for (int64_t b = 0; b < B; ++b)
          cell(k, s, b, j0, j1 - j0, gh.data() + first.row(s, 0, b) * G + 3 * j0, j1 - j0, hcur, hnext);
      }
  };
  run_steps(sp, TT, H, B, st, step);
  std::copy(st.cur, st.cur + B * H, h_n);
}

template <typename T, typename TW = Tiled<T>, typename WT = T>
void rnn_forward(const T* gx, const T* h0, const WT* w_hh_, int64_t H, bool relu, const Seq& sq,
                 T* y, T* h_n) {
  const int64_t B = sq.B, TT = sq.T;
  const bool tiled = TW::use(TT, H * H);
  const T* w_hh = same_type<T>(w_hh_);
  const Slices sl = make_slices(H, B * H, TW::panel_units(1));
  std::unique_ptr<TW> tw(tiled ? new TW(w_hh_, H, 1, 1, H, H, B, sl) : nullptr);
  const Split sp = make_split(sl, B, TW::block_rows(1), H * H * int64_t(sizeof(WT)), tiled, TT, &sq);
  const int64_t ldg = tiled ? tw->ldc() : H;
  Buf<T> gh(B * ldg), ha(B * H), hb(B * H);
  std::copy(h0, h0 + B * H, ha.data());
  PingPong<T> st{ha.data(), hb.data()};
  const FirstStep first(h0, B * H);
  auto cell = [&](int64_t s, int64_t b, int64_t j0, int64_t nu, const T* a, const T* hcur, T* hnext) {
        const int64_t L = sq.len(b);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const T* x = gx + (t * B + b) * H + j0;
          T* out = hnext + b * H + j0;
          if (relu) {
#pragma omp simd
            for (int64_t u = 0; u < nu; ++u) out[u] = rnn_forward_unit(x[u] + a[u], true);
          } else {
            const int64_t u0 = rnn_tanh_cells8(x, a, out, nu);  // float32: 8 at a time (tanh8)
#pragma omp simd
            for (int64_t u = u0; u < nu; ++u) out[u] = rnn_forward_unit(x[u] + a[u], false);
          }
          std::copy(out, out + nu, y + (t * B + b) * H + j0);
        } else {
          std::fill(y + (s * B + b) * H + j0, y + (s * B + b) * H + j0 + nu, T(0));
          std::copy(hcur + b * H + j0, hcur + b * H + j0 + nu, hnext + b * H + j0);
        }
  };
  // Step s for units [j0, j1) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t s, int64_t j0, int64_t j1, int64_t b0, int64_t b1, PingPong<T>& hs) {
      const T* hcur = hs.cur;
      T* hnext = hs.next;
      const int64_t nr = first.gemm_rows(s, sq.rows(s, b0, b1));  // (rows that ended: skipped)
      if (tiled) {
        // The slice's GEMM panel by panel, then its cell math row by row (sequential in gx/y).
        const int64_t p0 = tw->first_panel(j0), p1 = tw->end_panel(j1);
        const auto A = tw->rows_of(k, hcur + b0 * H, H, nr);
        tw->gemm_gates(p0, p1, nr, A.p, A.ld, gh.data() + b0 * ldg, ldg, s & 1);
        for (int64_t b = b0; b < b1; ++b)
          cell(s, b, j0, j1 - j0, gh.data() + first.row(s, b0, b) * ldg + j0, hcur, hnext);
      } else {  // BLAS
        gemm_nt<T>(nr, j1 - j0, H, hcur + b0 * H, H, w_hh + j0 * H, H, gh.data() + b0 * H + j0, H, T(0));
        for (int64_t b = b0; b < b1; ++b) cell(s, b, j0, j1 - j0, gh.data() + first.row(s, b0, b) * H + j0, hcur, hnext);
      }
      (void)k;
  };
  run_steps(sp, TT, H, B, st, step);
  std::copy(st.cur, st.cur + B * H, h_n);
}

// ----------------------------------------------------------------------------- backward
// dh carries dL/dh_{t} between steps. At each step the GEMM of the previous (later)
// step's pre-activation gradient, dpre_{s+1} @ W_hh, is added into dh (beta = 1):
// rows that were padded at s+1 have dpre = 0, so their dh passes through unchanged,
// and rows that were active hold only the cell's direct term (0 for LSTM and RNN,
// z * dh for GRU), written by the pointwise part of step s+1.
// The pre-activation gradients of the step just done: the A operand of the next (earlier)
// step's GEMM dh += dpre @ W_hh. The pointwise writes them to a [T, B, N] output anyway
// (grad_gx; GRU: dgh). When all rows of a step share one time index (not reverse, or no
// lengths) that output's rows are used in place; otherwise (reverse with lengths) the
// pointwise also writes a gathered copy per row (row(b)) into a ping-pong buffer.
// StepGrads owns the ping-pong buffers; its Cursor (run_steps' loop state, one copy per
// thread when the loop is split by rows) says where this step's and the last step's rows are.
template <typename T>
struct StepGrads {
  const Seq& sq;
  T* out;
  int64_t N;
  bool direct;
  Buf<T> a, b;
  StepGrads(const Seq& s, T* out_, int64_t N_)
      : sq(s), out(out_), N(N_), direct(!s.reverse || s.lengths == nullptr),
        a(direct ? 0 : s.B * N_), b(direct ? 0 : s.B * N_) {}
  struct Cursor {
    const StepGrads* g;
    T* cur;   // this step's rows (written by the pointwise)
    T* next;  // the step just done (read by the GEMM)
    void begin(int64_t i) {  // the i-th step done: s = T - 1 - i
      const int64_t s = g->sq.T - 1 - i;
      if (g->direct) cur = g->out + (g->sq.reverse ? g->sq.T - 1 - s : s) * g->sq.B * g->N;
    }
    T* row(int64_t bi, int64_t j0) const { return g->direct ? nullptr : cur + bi * g->N + j0; }  // null: in place
    void end() {
      if (g->direct) next = cur;
      else std::swap(cur, next);
    }
  };
  Cursor cursor() { return {this, direct ? nullptr : a.data(), direct ? nullptr : b.data()}; }
};

// The backward's recurrent GEMM, dh[b0:b1, j0:j1] += dnext[b0:b1] @ W_hh[:, j0:j1] (dnext
// [B, KG], W_hh [KG, H]), on W_hh packed into 32-unit panels once per call (tiled path;
// slice k's columns go through its own B x 32 scratch: gemm_panel's `exact`). TW/WT: a
// bfloat16 W_hh on TiledBF (then dnext's rows are rounded to bfloat16, rows_of).
template <typename T, typename TW = Tiled<T>, typename WT = T>
struct DhGemm {
  std::unique_ptr<TW> tb;
  mutable Buf<T> tmp;
  int64_t KG, H, B;
  DhGemm(bool tiled, const WT* w_hh, int64_t H_, int64_t KG_, int64_t B_, const Slices& sl)
      : tb(tiled ? new TW(w_hh, 1, H_, 1, H_, KG_, B_, sl) : nullptr),
        tmp(tiled ? sl.threads * B_ * 32 : 0), KG(KG_), H(H_), B(B_) {}  // (a split's n() <= sl.threads)
  void operator()(int k, int64_t j0, int64_t j1, int64_t b0, int64_t b1, const T* dnext, T* dh) const {
    const auto A = tb->rows_of(k, dnext + b0 * KG, KG, b1 - b0);
    for (int64_t p = tb->first_panel(j0); p < tb->end_panel(j1); ++p)
      tb->gemm_panel(p, b1 - b0, A.p, A.ld, dh + b0 * H, H, true, true, tmp.data() + k * B * 32);
  }
};

template <typename T, typename TW = Tiled<T>, typename WT = T>
void lstm_backward(const T* grad_y, const T* grad_h_n, const T* grad_c_n, const T* c0,
                   const WT* w_hh_, const T* w_hr, int64_t H, int64_t P, const Seq& sq,
                   const T* gates, const T* cells,
                   T* grad_gx, T* grad_h0, T* grad_c0, T* dfirst, T* dhs, T* hr) {
  const int64_t B = sq.B, TT = sq.T, G = 4 * H;
  const bool proj = w_hr != nullptr;
  const bool tiled = !proj && TW::use(TT, G * P);
  const T* w_hh = same_type<T>(w_hh_);  // null for a bfloat16 weight (TiledBF: always tiled)
  const Slices sl = make_slices(H, B * G * (proj ? 1 : 2), tiled ? TW::panel_units(1) : 8);
  const Slices slp = make_slices(P, B * G);
  Buf<T> dh(grad_h_n, grad_h_n + B * P), dc(grad_c_n, grad_c_n + B * H);
  Buf<T> dht(proj ? B * P : 0), dhr(proj ? B * H : 0);
  StepGrads<T> sg(sq, grad_gx, G);
  typename StepGrads<T>::Cursor st = sg.cursor();
  const int64_t KG = G;
  const DhGemm<T, TW, WT> dh_gemm(tiled, w_hh_, H, KG, B, sl);
  const Split sp = make_split(sl, B, TW::block_rows(1), G * P * int64_t(sizeof(WT)) + P * H * proj * int64_t(sizeof(T)),
                              tiled, TT, &sq);
  // With projection, before step s: dL/dh_t (columns [p0, p0 + np) of rows [b0, b1)) -> dht.
  auto project_back = [&](int64_t s, int64_t p0, int64_t np, int64_t b0, int64_t b1, const T* dnext) {
        if (s < TT - 1)
          gemm_nn<T>(sq.rows(s + 1, b0, b1), np, G, dnext + b0 * G, G, w_hh + p0, P, dh.data() + b0 * P + p0, P, T(1));
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t L = sq.len(b);
          T* d = dh.data() + b * P + p0;
          T* dt = dht.data() + b * P + p0;
          if (s < L) {
            const int64_t t = sq.reverse ? L - 1 - s : s;
            const T* gy = grad_y + (t * B + b) * P + p0;
            T* ds = dhs + (t * B + b) * P + p0;
#pragma omp simd
            for (int64_t u = 0; u < np; ++u) {
              const T v = d[u] + gy[u];
              dt[u] = v; ds[u] = v; d[u] = T(0);
            }
          } else {
            std::fill(dt, dt + np, T(0));
            std::fill(dhs + (s * B + b) * P + p0, dhs + (s * B + b) * P + p0 + np, T(0));
          }
        }
  };
  // By units, that is a parallel region of its own before each step, over P's columns.
  auto pre = [&](int64_t i, typename StepGrads<T>::Cursor& cs) {
    if (proj)
      run_slices(slp, [&](int k) { project_back(TT - 1 - i, slp.lo(k), slp.hi(k) - slp.lo(k), 0, B, cs.next); });
  };
  // Step s for units [j0, j0 + nu) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t i, int64_t j0, int64_t j1, int64_t b0, int64_t b1,
                  typename StepGrads<T>::Cursor& cs) {
      const int64_t s = TT - 1 - i, nu = j1 - j0;
      if (proj) {
        if (sp.by_rows()) project_back(s, 0, P, b0, b1, cs.next);  // (by units: before the step)
        gemm_nn<T>(sq.rows(s, b0, b1), nu, P, dht.data() + b0 * P, P, w_hr + j0, H, dhr.data() + b0 * H + j0, H, T(0));
      } else if (s < TT - 1) {  // (rows that had ended at step s + 1 have dpre = 0: skipped)
        const int64_t nr = sq.rows(s + 1, b0, b1);
        if (tiled) dh_gemm(k, j0, j1, b0, b0 + nr, cs.next, dh.data());
        else gemm_nn<T>(nr, nu, G, cs.next + b0 * G, G, w_hh + j0, H, dh.data() + b0 * H + j0, H, T(1));
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = sq.len(b);
        T* dcr = cs.row(b, j0);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const int64_t tp = sq.reverse ? t + 1 : t - 1;
          const T* gt = gates + (t * B + b) * G + j0;
          const T* ct = cells + (t * B + b) * H + j0;
          const T* cp = s == 0 ? c0 + b * H + j0 : cells + (tp * B + b) * H + j0;
          T* gg = grad_gx + (t * B + b) * G + j0;
          T* dcb = dc.data() + b * H + j0;
          if (proj) {
            const T* dr = dhr.data() + b * H + j0;
            T* hrt = hr + (t * B + b) * H + j0;
            // float32 (AVX2): 8 units at a time with an inline tanh; the loop does the rest.
            const int64_t u8 = lstm_backward_cells8(gt, ct, cp, dr, static_cast<const T*>(nullptr),
                                                    static_cast<T*>(nullptr), dcb, gg, dcr, hrt, H, nu);
#pragma omp simd
            for (int64_t u = u8; u < nu; ++u) {
              T dai, daf, dag, dao, dcp;
              lstm_backward_unit(gt[u], gt[H + u], gt[2 * H + u], gt[3 * H + u], ct[u], cp[u], dr[u], dcb[u],
                                 dai, daf, dag, dao, dcp);
              gg[u] = dai; gg[H + u] = daf; gg[2 * H + u] = dag; gg[3 * H + u] = dao;
              if (dcr) { dcr[u] = dai; dcr[H + u] = daf; dcr[2 * H + u] = dag; dcr[3 * H + u] = dao; }
              dcb[u] = dcp;
              hrt[u] = gt[3 * H + u] * tanh_(ct[u]);
            }
          } else {
            T* d = dh.data() + b * H + j0;
            const T* gy = grad_y + (t * B + b) * H + j0;
            // float32 (AVX2): 8 units at a time with an inline tanh; the loop does the rest.
            const int64_t u8 =
                lstm_backward_cells8(gt, ct, cp, d, gy, d, dcb, gg, dcr, static_cast<T*>(nullptr), H, nu);
#pragma omp simd
            for (int64_t u = u8; u < nu; ++u) {
              T dai, daf, dag, dao, dcp;
              lstm_backward_unit(gt[u], gt[H + u], gt[2 * H + u], gt[3 * H + u], ct[u], cp[u], d[u] + gy[u],
                                 dcb[u], dai, daf, dag, dao, dcp);
              gg[u] = dai; gg[H + u] = daf; gg[2 * H + u] = dag; gg[3 * H + u] = dao;
              if (dcr) { dcr[u] = dai; dcr[H + u] = daf; dcr[2 * H + u] = dag; dcr[3 * H + u] = dao; }
              dcb[u] = dcp;
              d[u] = T(0);
            }
          }
        } else {
          T* gg = grad_gx + (s * B + b) * G + j0;
          for (int q = 0; q < 4; ++q) {
            std::fill(gg + q * H, gg + q * H + nu, T(0));
            if (dcr) std::fill(dcr + q * H, dcr + q * H + nu, T(0));
          }
          if (proj) std::fill(hr + (s * B + b) * H + j0, hr + (s * B + b) * H + j0 + nu, T(0));
        }
      }
  };
  run_steps(sp, TT, H, B, st, step, pre);
  const T* dnext = st.next;
  if (TT > 0 && grad_h0 && tiled) {
    run_slices(sl, [&](int k) { dh_gemm(k, sl.lo(k), sl.hi(k), 0, B, dnext, dh.data()); });
  } else if (TT > 0 && grad_h0) {
    run_slices(slp, [&](int k) {
      const int64_t p0 = slp.lo(k), np = slp.hi(k) - p0;
      gemm_nn<T>(B, np, G, dnext, G, w_hh + p0, P, dh.data() + p0, P, T(1));
    });
  }
  if (grad_h0) std::copy(dh.begin(), dh.end(), grad_h0);
  std::copy(dc.begin(), dc.end(), grad_c0);
  if (TT > 0) std::copy(dnext, dnext + B * G, dfirst);
  else std::fill(dfirst, dfirst + B * G, T(0));
}

template <typename T, typename TW = Tiled<T>, typename WT = T>
void gru_backward(const T* grad_y, const T* grad_h_n, const T* h0, const WT* w_hh_, int64_t H,
                  const Seq& sq, const T* y, const T* gates, const T* hn,
                  T* grad_gx, T* grad_h0, T* dfirst, T* dgh) {
  const int64_t B = sq.B, TT = sq.T, G = 3 * H;
  const bool tiled = TW::use(TT, G * H);
  const T* w_hh = same_type<T>(w_hh_);
  const Slices sl = make_slices(H, B * G * 2, tiled ? TW::panel_units(1) : 8);
  Buf<T> dh(grad_h_n, grad_h_n + B * H);
  StepGrads<T> sg(sq, dgh, G);  // dgh: (dxr, dxz, dhn), what the GEMM takes
  typename StepGrads<T>::Cursor st = sg.cursor();
  const int64_t KG = G;
  const DhGemm<T, TW, WT> dh_gemm(tiled, w_hh_, H, KG, B, sl);
  const Split sp = make_split(sl, B, TW::block_rows(1), KG * H * int64_t(sizeof(WT)), tiled, TT, &sq);
  // Step s for units [j0, j0 + nu) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t i, int64_t j0, int64_t j1, int64_t b0, int64_t b1,
                  typename StepGrads<T>::Cursor& cs) {
      const int64_t s = TT - 1 - i, nu = j1 - j0;
      if (s < TT - 1) {  // (rows that had ended at step s + 1 have dpre = 0: skipped)
        const int64_t nr = sq.rows(s + 1, b0, b1);
        if (tiled) dh_gemm(k, j0, j1, b0, b0 + nr, cs.next, dh.data());
        else gemm_nn<T>(nr, nu, G, cs.next + b0 * G, G, w_hh + j0, H, dh.data() + b0 * H + j0, H, T(1));
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = sq.len(b);
        T* dcr = cs.row(b, j0);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const int64_t tp = sq.reverse ? t + 1 : t - 1;
          const T* gt = gates + (t * B + b) * G + j0;
          const T* hs = hn + (t * B + b) * H + j0;
          const T* hp = s == 0 ? h0 + b * H + j0 : y + (tp * B + b) * H + j0;
          const T* gy = grad_y + (t * B + b) * H + j0;
          T* gg = grad_gx + (t * B + b) * G + j0;
          T* dg = dgh + (t * B + b) * G + j0;
          T* d = dh.data() + b * H + j0;
#pragma omp simd
          for (int64_t u = 0; u < nu; ++u) {
            T dxr, dxz, dxn, dhn, direct;
            gru_backward_unit(gt[u], gt[H + u], gt[2 * H + u], hs[u], hp[u], d[u] + gy[u],
                              dxr, dxz, dxn, dhn, direct);
            gg[u] = dxr; gg[H + u] = dxz; gg[2 * H + u] = dxn;
            dg[u] = dxr; dg[H + u] = dxz; dg[2 * H + u] = dhn;
            if (dcr) { dcr[u] = dxr; dcr[H + u] = dxz; dcr[2 * H + u] = dhn; }
            d[u] = direct;
          }
        } else {
          T* gg = grad_gx + (s * B + b) * G + j0;
          T* dg = dgh + (s * B + b) * G + j0;
          for (int q = 0; q < 3; ++q) {
            std::fill(gg + q * H, gg + q * H + nu, T(0));
            std::fill(dg + q * H, dg + q * H + nu, T(0));
            if (dcr) std::fill(dcr + q * H, dcr + q * H + nu, T(0));
          }
        }
      }
  };
  run_steps(sp, TT, H, B, st, step);
  const T* dnext = st.next;
  if (TT > 0 && grad_h0) {
    run_slices(sl, [&](int k) {
      const int64_t j0 = sl.lo(k), nu = sl.hi(k) - j0;
      if (tiled) dh_gemm(k, j0, j0 + nu, 0, B, dnext, dh.data());
      else gemm_nn<T>(B, nu, G, dnext, G, w_hh + j0, H, dh.data() + j0, H, T(1));
    });
  }
  if (grad_h0) std::copy(dh.begin(), dh.end(), grad_h0);
  if (TT > 0) std::copy(dnext, dnext + B * G, dfirst);
  else std::fill(dfirst, dfirst + B * G, T(0));
}

template <typename T, typename TW = Tiled<T>, typename WT = T>
void rnn_backward(const T* grad_y, const T* grad_h_n, const WT* w_hh_, int64_t H, bool relu,
                  const Seq& sq, const T* y, T* grad_gx, T* grad_h0, T* dfirst) {
  const int64_t B = sq.B, TT = sq.T;
  const bool tiled = TW::use(TT, H * H);
  const T* w_hh = same_type<T>(w_hh_);
  const Slices sl = make_slices(H, B * H * 2, tiled ? TW::panel_units(1) : 8);
  Buf<T> dh(grad_h_n, grad_h_n + B * H);
  StepGrads<T> sg(sq, grad_gx, H);
  typename StepGrads<T>::Cursor st = sg.cursor();
  const int64_t KG = H;
  const DhGemm<T, TW, WT> dh_gemm(tiled, w_hh_, H, KG, B, sl);
  const Split sp = make_split(sl, B, TW::block_rows(1), KG * H * int64_t(sizeof(WT)), tiled, TT, &sq);
  // Step s for units [j0, j0 + nu) of rows [b0, b1) (slice k).
  auto step = [&](int k, int64_t i, int64_t j0, int64_t j1, int64_t b0, int64_t b1,
                  typename StepGrads<T>::Cursor& cs) {
      const int64_t s = TT - 1 - i, nu = j1 - j0;
      if (s < TT - 1) {  // (rows that had ended at step s + 1 have dpre = 0: skipped)
        const int64_t nr = sq.rows(s + 1, b0, b1);
        if (tiled) dh_gemm(k, j0, j1, b0, b0 + nr, cs.next, dh.data());
        else gemm_nn<T>(nr, nu, H, cs.next + b0 * H, H, w_hh + j0, H, dh.data() + b0 * H + j0, H, T(1));
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t L = sq.len(b);
        T* dcr = cs.row(b, j0);
        if (s < L) {
          const int64_t t = sq.reverse ? L - 1 - s : s;
          const T* yt = y + (t * B + b) * H + j0;
          const T* gy = grad_y + (t * B + b) * H + j0;
          T* gg = grad_gx + (t * B + b) * H + j0;
          T* d = dh.data() + b * H + j0;
          if (relu) {
#pragma omp simd
            for (int64_t u = 0; u < nu; ++u) {
              const T v = rnn_backward_unit(yt[u], d[u] + gy[u], true);
              gg[u] = v; d[u] = T(0);
              if (dcr) dcr[u] = v;
            }
          } else {
#pragma omp simd
            for (int64_t u = 0; u < nu; ++u) {
              const T v = rnn_backward_unit(yt[u], d[u] + gy[u], false);
              gg[u] = v; d[u] = T(0);
              if (dcr) dcr[u] = v;
            }
          }
        } else {
          std::fill(grad_gx + (s * B + b) * H + j0, grad_gx + (s * B + b) * H + j0 + nu, T(0));
          if (dcr) std::fill(dcr, dcr + nu, T(0));
        }
      }
  };
  run_steps(sp, TT, H, B, st, step);
  const T* dnext = st.next;
  if (TT > 0 && grad_h0) {
    run_slices(sl, [&](int k) {
      const int64_t j0 = sl.lo(k), nu = sl.hi(k) - j0;
      if (tiled) dh_gemm(k, j0, j0 + nu, 0, B, dnext, dh.data());
      else gemm_nn<T>(B, nu, H, dnext, H, w_hh + j0, H, dh.data() + j0, H, T(1));
    });
  }
  if (grad_h0) std::copy(dh.begin(), dh.end(), grad_h0);
  if (TT > 0) std::copy(dnext, dnext + B * H, dfirst);
  else std::fill(dfirst, dfirst + B * H, T(0));
}

// ----------------------------------------------------------------------------- narrow GEMMs over all steps
// cpu::gemm's kernels for N <= 32 columns (kernels.h: kNarrowColumns), where its packed
// micro-kernel pads N to one 32-column panel that one thread computes: the input
// projection to few gates (an RNN of hidden size <= 32), and the backward of a few input
// features (a time series' channels: dx, dW_ih) or of a small hidden size (dW_hh).

// Rows [m, m + R) of C = A @ B on B padded to NP columns (wp [K, NP], zeros beyond N),
// the R x NP sums held in registers along N, starting from init[:NP] (null: 0). (Dot
// products along k instead, one reduction per output, measured 2-3x slower at N=8.)
template <typename T, int NP, int R>
inline void narrow_rows(int64_t K, int64_t N, const T* a, int64_t lda, const T* wp, const T* init, T* c,
                        int64_t ldc) {
  T s[R][NP];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NP; ++j) s[r][j] = init ? init[j] : T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = wp + k * NP;
    for (int r = 0; r < R; ++r) {
      const T v = a[r * lda + k];
#pragma omp simd
      for (int j = 0; j < NP; ++j) s[r][j] += v * wk[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < N; ++j) c[r * ldc + j] = s[r][j];
}
template <typename T, int NP>
inline void narrow_block_np(int64_t m0, int64_t m1, int64_t K, int64_t N, const T* a, int64_t lda, const T* wp,
                            const T* init, T* c, int64_t ldc) {
  constexpr int R = NP == 8 ? 8 : NP == 16 ? 4 : 2;  // (R x NP / 8 accumulators: 8 of AVX2's 16 registers)
  int64_t m = m0;
  for (; m + R <= m1; m += R) narrow_rows<T, NP, R>(K, N, a + m * lda, lda, wp, init, c + m * ldc, ldc);
  for (; m < m1; ++m) narrow_rows<T, NP, 1>(K, N, a + m * lda, lda, wp, init, c + m * ldc, ldc);
}

// C[M,N] = A[M,K] @ B (+ bias[N] if not null), A row-major (rows sam apart), B(k, n) =
// Bm[k * sbk + n * sbn], N <= 32: the threads split the rows; B copied, padded to a
// multiple of 8 columns. (The forward projection, B = w^T; dx = grad @ w, B = w.)
template <typename T>
void narrow_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, const T* Bm, int64_t sbk, int64_t sbn,
                 T* C, int64_t ldc, const T* bias) {
  static_assert(kNarrowColumns <= 32, "narrow_gemm runs at most 32 columns");
  const int64_t NP = (N + 7) / 8 * 8;
  Buf<T> wp(K * NP, T(0)), init(NP, T(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) wp[k * NP + j] = Bm[k * sbk + j * sbn];
  if (bias) std::copy(bias, bias + N, init.data());
  const T* in = bias ? init.data() : nullptr;
  const Slices sl = make_slices(M, (K + 1) * N, 16);
  run_slices(sl, [&](int t) {
    const int64_t m0 = sl.lo(t), m1 = sl.hi(t);
    switch (NP / 8) {
      case 1: return narrow_block_np<T, 8>(m0, m1, K, N, A, sam, wp.data(), in, C, ldc);
      case 2: return narrow_block_np<T, 16>(m0, m1, K, N, A, sam, wp.data(), in, C, ldc);
      case 3: return narrow_block_np<T, 24>(m0, m1, K, N, A, sam, wp.data(), in, C, ldc);
      default: return narrow_block_np<T, 32>(m0, m1, K, N, A, sam, wp.data(), in, C, ldc);
    }
  });
}

// A weight's gradient C[M,N] (+)= A @ B (+ bias[N] if not acc) with A = d^T (A(m, k) =
// A[m + k * sak]: d [K, M] row-major, all steps' rows of the gate gradients) and B row-major
// [K, N] (rows sbk apart: x or h), N <= 32, and colsum[M] (if not null) = the column sums
// of d (a bias gradient), in one pass over d, 4 of its rows at a time. The threads split
// d's rows, each summing into its own C^T [N, M] (the updates run along m) and colsum,
// added up at the end. (T=128, B=256, G=64, I=8: dW_ih and db 1.67 -> 0.30 ms.)
template <typename T>
void narrow_gemm_t(int64_t M, int64_t N, int64_t K, const T* A, int64_t sak, const T* Bm, int64_t sbk, T* C,
                   int64_t ldc, bool acc, const T* bias, T* colsum) {
  const Slices sl = make_slices(K, M * (N + 1), 16);
  const int nt = sl.n;
  const int64_t per = N * M + (colsum ? M : 0);  // one thread's partial sums: C^T, then colsum
  Buf<T> part(per * nt, T(0));
  run_slices(sl, [&](int t) {
    T* pc = part.data() + t * per;
    T* ps = pc + N * M;
    const int64_t k1 = sl.hi(t);
    int64_t k = narrow_partials(pc, colsum ? ps : nullptr, M, N, A, sak, Bm, sbk, sl.lo(t), k1);  // (zmm: all)
    for (; k + 4 <= k1; k += 4) {
      const T *d0 = A + k * sak, *d1 = d0 + sak, *d2 = d1 + sak, *d3 = d2 + sak;
      const T* x0 = Bm + k * sbk;
      for (int64_t j = 0; j < N; ++j) {
        const T a0 = x0[j], a1 = x0[sbk + j], a2 = x0[2 * sbk + j], a3 = x0[3 * sbk + j];
        T* p = pc + j * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) p[m] += a0 * d0[m] + a1 * d1[m] + a2 * d2[m] + a3 * d3[m];
      }
      if (colsum) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ps[m] += (d0[m] + d1[m]) + (d2[m] + d3[m]);
      }
    }
    for (; k < k1; ++k) {  // (the last rows)
      const T* d0 = A + k * sak;
      const T* x0 = Bm + k * sbk;
      for (int64_t j = 0; j < N; ++j) {
        T* p = pc + j * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) p[m] += x0[j] * d0[m];
      }
      if (colsum) {
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) ps[m] += d0[m];
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      T s = acc ? C[m * ldc + j] : bias ? bias[j] : T(0);
      for (int t = 0; t < nt; ++t) s += part[t * per + j * M + m];
      C[m * ldc + j] = s;
    }
  for (int64_t m = 0; colsum && m < M; ++m) {
    T s = 0;
    for (int t = 0; t < nt; ++t) s += part[t * per + N * M + m];
    colsum[m] = s;
  }
}
