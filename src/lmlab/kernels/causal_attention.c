/* Exact causal softmax attention, float32, CPU, forward and backward, register-blocked.
 *
 * Built by lmlab/kernels/attention.py on first use (cc -O3 -march=native -fopenmp) and called through ctypes.
 * Each job is one (batch, key/value head) pair - with grouped-query attention it serves every query head of the
 * group, so a job owns the gradients of its keys and values - and runs on one thread: results do not depend on
 * the number of threads, which the caller chooses (`nthreads`; 1 runs without a parallel region).
 *
 * Math (per batch b, head h, query i; s_ij = scale * q_i . k_j over j <= i):
 *   forward   m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i), o_i = sum_j exp(s_ij - m_i) v_j / l_i,
 *             lse_i = m_i + log l_i (kept for backward, as flash attention does)
 *   backward  p_ij = exp(s_ij - lse_i), delta_i = do_i . o_i, dv_j += p_ij do_i,
 *             ds_ij = p_ij (do_i . v_j - delta_i), dq_i = scale sum_j ds_ij k_j, dk_j += scale ds_ij q_i
 *
 * Blocking: R = 8 query rows at a time. Scores (and do . v) are vectors over 16 key positions accumulated over d
 * from the job's transposed keys (values), so every key vector loaded serves 8 rows; o = p V and dq = ds K are
 * vectors over d accumulated over key positions from row-major copies, 4 rows x up to 64 columns in registers.
 * The backward scales q as the forward did, so it recomputes the forward's scores bit for bit.
 * Vectors are GCC/Clang vector extensions (one AVX-512 register, two AVX2 ones, ...). No sum is reassociated
 * beyond that fixed order and no -ffast-math: NaN and Inf propagate as in IEEE arithmetic, and masked (future)
 * positions are selected away, never multiplied by 0, so a NaN there cannot reach an earlier query.
 *
 * Layout: element (b, t, h, d) of q is q[b*qs.b + t*qs.t + h*qs.h + d], likewise k and v (with the Hkv key/value
 * heads; query head h reads kv head h / (H / Hkv)) and the gradients dq, dk, dv with their own strides, of which
 * every element is written. out is [B, T, H, D] contiguous, lse [B, H, T].
 * Returns 0, or 1 when a work buffer could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define L 16 /* lanes per vector: key positions (scores) or columns (p V, ds K) */
#define R 8  /* query rows per block */
#define RG 4 /* query rows per p V / ds K pass */
#define CG 4 /* vectors of columns per p V / ds K pass */

typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf select_v(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf load(const float *p) { return *(const vf *)p; }
static inline void store(float *p, vf x) { *(vf *)p = x; }

/* e^x lane by lane: x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial (about 1 ulp); NaN stays NaN. */
static inline vf exp_v(vf x) {
  vf xc = select_v(x < -87.0f, splat(-87.0f), select_v(x > 88.0f, splat(88.0f), x));
  vf t = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(t, vi);
  n += (vi)(t < __builtin_convertvector(n, vf)); /* truncation -> floor (true is -1) */
  vf nf = __builtin_convertvector(n, vf);
  vf r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vf scale = (vf)((n + 127) << 23);
  return select_v(x == x, p * scale, x);
}

static inline float hsum(vf x) {
  float s = 0.0f;
  for (int l = 0; l < L; l++) s += x[l];
  return s;
}

static inline float hmax(vf x) {
  float m = -INFINITY;
  for (int l = 0; l < L; l++) m = x[l] > m ? x[l] : m;
  return m;
}

/* Lanes of key block j0 that query i may see (j <= i). */
static inline vi visible(int j0, int i) {
  vi j = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return j + j0 <= i;
}

typedef struct {
  long b, t, h;
} strides_t;

typedef struct {
  const float *q, *k, *v, *out, *dout, *lse; /* inputs (out, dout: backward only) */
  float *out_w, *lse_w, *dq, *dk, *dv;       /* outputs of forward (out_w, lse_w) or backward (dq, dk, dv) */
  int B, T, H, Hkv, D, Tp, Dp;
  strides_t qs, ks, vs, dqs, dks, dvs;
  float scale;
} args_t;

/* Runs job(b, kv head) for every pair, in parallel, each thread with its own 64-byte aligned work buffer. */
static int for_each_job(const args_t *a, size_t floats, int nthreads, void (*job)(const args_t *, long, long, float *)) {
  int failed = 0;
  size_t bytes = (sizeof(float) * floats + 63) / 64 * 64;
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (nthreads > 1)
  {
    float *buffer = aligned_alloc(64, bytes);
    failed = buffer == NULL;
#pragma omp for schedule(dynamic, 1)
    for (long j = 0; j < (long)a->B * a->Hkv; j++)
      if (!failed) job(a, j / a->Hkv, j % a->Hkv, buffer);
    free(buffer);
  }
  return failed;
}

/* xT [D][Tp] (transposed, zero beyond T) and/or xr [Tp][Dp] (row-major, zero beyond T and D) of one head. */
static void gather(const float *x, long st, int T, int D, int Tp, int Dp, float *xT, float *xr) {
  if (xT) {
    for (int d = 0; d < D; d++) {
      for (int j = 0; j < T; j++) xT[(long)d * Tp + j] = x[j * st + d];
      for (int j = T; j < Tp; j++) xT[(long)d * Tp + j] = 0.0f;
    }
  }
  if (xr) {
    memset(xr, 0, sizeof(float) * (size_t)Tp * Dp);
    for (int j = 0; j < T; j++) memcpy(xr + (long)j * Dp, x + j * st, sizeof(float) * D);
  }
}

/* acc[r] = sum_d rows[r][d] xT[d][j0 .. j0 + L) for the R rows (rows: R x D, row-major, stride D). */
static inline void row_dots(const float *rows, const float *xT, int j0, int D, int Tp, vf acc[R]) {
  for (int r = 0; r < R; r++) acc[r] = splat(0.0f);
  for (int d = 0; d < D; d++) {
    vf x = load(xT + (long)d * Tp + j0);
    for (int r = 0; r < R; r++) acc[r] += x * rows[r * D + d];
  }
}

/* out[r][c] = sum_j w[r][j] xr[j][c] for rows r0 .. r0 + RG of the block (row i0 + r sees j <= i0 + r), columns
 * c0 .. c0 + NC * L; w: R x Tp. Keys j <= i0 + r0 are seen by all RG rows, the next RG - 1 by some. */
static inline __attribute__((always_inline)) void weighted_rows(const float *w, const float *xr, int Tp, int Dp,
                                                                int i0, int r0, int c0, float *out, const int NC) {
  vf acc[RG][CG];
  for (int r = 0; r < RG; r++)
    for (int c = 0; c < NC; c++) acc[r][c] = splat(0.0f);
  int shared = i0 + r0 + 1;
  for (int j = 0; j < shared; j++) {
    const float *x = xr + (long)j * Dp + c0;
    vf xv[CG];
    for (int c = 0; c < NC; c++) xv[c] = load(x + c * L);
    for (int r = 0; r < RG; r++) {
      float wr = w[(r0 + r) * Tp + j];
      for (int c = 0; c < NC; c++) acc[r][c] += xv[c] * wr;
    }
  }
  for (int j = shared; j < shared + RG - 1; j++)
    for (int r = j - i0 - r0; r < RG; r++) {
      const float *x = xr + (long)j * Dp + c0;
      float wr = w[(r0 + r) * Tp + j];
      for (int c = 0; c < NC; c++) acc[r][c] += load(x + c * L) * wr;
    }
  for (int r = 0; r < RG; r++)
    for (int c = 0; c < NC; c++) store(out + (r0 + r) * Dp + c0 + c * L, acc[r][c]);
}

/* Every column group of weighted_rows for the R rows of a block: out R x Dp. */
static void weighted_block(const float *w, const float *xr, int Tp, int Dp, int i0, float *out) {
  for (int r0 = 0; r0 < R; r0 += RG)
    for (int c0 = 0; c0 < Dp; c0 += CG * L) {
      int nc = (Dp - c0) / L < CG ? (Dp - c0) / L : CG;
      switch (nc) {
        case 1: weighted_rows(w, xr, Tp, Dp, i0, r0, c0, out, 1); break;
        case 2: weighted_rows(w, xr, Tp, Dp, i0, r0, c0, out, 2); break;
        case 3: weighted_rows(w, xr, Tp, Dp, i0, r0, c0, out, 3); break;
        default: weighted_rows(w, xr, Tp, Dp, i0, r0, c0, out, 4); break;
      }
    }
}

/* rows[r][d] = x[(i0 + r) * st + d] * mul for r < n, 0 for the block's rows past T. */
static void load_rows(const float *x, long st, int i0, int n, int D, float mul, float *rows) {
  for (int r = 0; r < R; r++)
    for (int d = 0; d < D; d++) rows[r * D + d] = r < n ? x[(i0 + r) * st + d] * mul : 0.0f;
}

static void forward_job(const args_t *a, long b, long hk, float *buffer) {
  int T = a->T, D = a->D, Tp = a->Tp, Dp = a->Dp, group = a->H / a->Hkv;
  float *kT = buffer, *vr = kT + (size_t)D * Tp, *s = vr + (size_t)Tp * Dp, *o = s + (size_t)R * Tp;
  float *qrows = o + (size_t)R * Dp;
  gather(a->k + b * a->ks.b + hk * a->ks.h, a->ks.t, T, D, Tp, Dp, kT, NULL);
  gather(a->v + b * a->vs.b + hk * a->vs.h, a->vs.t, T, D, Tp, Dp, NULL, vr);
  for (long h = hk * group; h < (hk + 1) * group; h++) {
    const float *q = a->q + b * a->qs.b + h * a->qs.h;
    for (int i0 = 0; i0 < T; i0 += R) {
      int n = T - i0 < R ? T - i0 : R, last = i0 + R - 1, blocks = last / L + 1;
      load_rows(q, a->qs.t, i0, n, D, a->scale, qrows);
      vf mx[R], acc[R], sum[R];
      for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY), sum[r] = splat(0.0f);
      for (int jb = 0; jb < blocks; jb++) {
        int j0 = jb * L;
        row_dots(qrows, kT, j0, D, Tp, acc);
        for (int r = 0; r < R; r++) {
          if (j0 + L - 1 > i0 + r) acc[r] = select_v(visible(j0, i0 + r), acc[r], splat(-INFINITY));
          store(s + r * Tp + j0, acc[r]);
          mx[r] = select_v(acc[r] > mx[r], acc[r], mx[r]);
        }
      }
      float m[R];
      for (int r = 0; r < R; r++) m[r] = hmax(mx[r]);
      for (int jb = 0; jb < blocks; jb++) {
        int j0 = jb * L;
        for (int r = 0; r < R; r++) {
          vf p = exp_v(load(s + r * Tp + j0) - m[r]);
          if (j0 + L - 1 > i0 + r) p = select_v(visible(j0, i0 + r), p, splat(0.0f));
          store(s + r * Tp + j0, p);
          sum[r] += p;
        }
      }
      weighted_block(s, vr, Tp, Dp, i0, o);
      for (int r = 0; r < n; r++) {
        float l = hsum(sum[r]);
        float *out = a->out_w + ((b * T + i0 + r) * a->H + h) * D;
        for (int d = 0; d < D; d++) out[d] = o[r * Dp + d] / l;
        a->lse_w[(b * a->H + h) * T + i0 + r] = m[r] + logf(l);
      }
    }
  }
}

static void backward_job(const args_t *a, long b, long hk, float *buffer) {
  int T = a->T, D = a->D, Tp = a->Tp, Dp = a->Dp, group = a->H / a->Hkv;
  float *kT = buffer, *vT = kT + (size_t)D * Tp, *kr = vT + (size_t)D * Tp, *dkT = kr + (size_t)Tp * Dp;
  float *dvT = dkT + (size_t)D * Tp, *ds = dvT + (size_t)D * Tp, *dq = ds + (size_t)R * Tp;
  float *qrows = dq + (size_t)R * Dp, *gorows = qrows + (size_t)R * D;
  const float *kbase = a->k + b * a->ks.b + hk * a->ks.h, *vbase = a->v + b * a->vs.b + hk * a->vs.h;
  gather(kbase, a->ks.t, T, D, Tp, Dp, kT, kr);
  gather(vbase, a->vs.t, T, D, Tp, Dp, vT, NULL);
  memset(dkT, 0, sizeof(float) * (size_t)D * Tp * 2);
  for (long h = hk * group; h < (hk + 1) * group; h++) {
    const float *q = a->q + b * a->qs.b + h * a->qs.h;
    float *dqbase = a->dq + b * a->dqs.b + h * a->dqs.h;
    for (int i0 = 0; i0 < T; i0 += R) {
      int n = T - i0 < R ? T - i0 : R, last = i0 + R - 1, blocks = last / L + 1;
      load_rows(q, a->qs.t, i0, n, D, a->scale, qrows); /* scale q as forward did: the same scores */
      load_rows(a->dout + (b * T * a->H + h) * D, (long)a->H * D, i0, n, D, 1.0f, gorows);
      float lse[R], delta[R];
      for (int r = 0; r < R; r++) {
        lse[r] = 0.0f, delta[r] = 0.0f; /* rows past T: their p and ds are selected away below */
        if (r >= n) continue;
        const float *o = a->out + ((b * T + i0 + r) * a->H + h) * D;
        for (int d = 0; d < D; d++) delta[r] = fmaf(o[d], gorows[r * D + d], delta[r]); /* like do . v_j */
        lse[r] = a->lse[(b * a->H + h) * T + i0 + r];
      }
      for (int jb = 0; jb < blocks; jb++) {
        int j0 = jb * L;
        vf p[R], dsv[R];
        row_dots(qrows, kT, j0, D, Tp, p);
        row_dots(gorows, vT, j0, D, Tp, dsv);
        for (int r = 0; r < R; r++) {
          p[r] = exp_v(p[r] - lse[r]);
          dsv[r] = p[r] * (dsv[r] - delta[r]); /* ds without scale: dk += ds (scale q), dq = scale ds k */
          if (j0 + L - 1 > i0 + r || r >= n) {
            vi seen = visible(j0, r < n ? i0 + r : -1);
            p[r] = select_v(seen, p[r], splat(0.0f));
            dsv[r] = select_v(seen, dsv[r], splat(0.0f));
          }
          store(ds + r * Tp + j0, dsv[r]);
        }
        for (int d = 0; d < D; d++) {
          vf dv = load(dvT + (long)d * Tp + j0), dk = load(dkT + (long)d * Tp + j0);
          for (int r = 0; r < R; r++) {
            dv += p[r] * gorows[r * D + d];
            dk += dsv[r] * qrows[r * D + d];
          }
          store(dvT + (long)d * Tp + j0, dv);
          store(dkT + (long)d * Tp + j0, dk);
        }
      }
      weighted_block(ds, kr, Tp, Dp, i0, dq);
      for (int r = 0; r < n; r++)
        for (int d = 0; d < D; d++) dqbase[(i0 + r) * a->dqs.t + d] = dq[r * Dp + d] * a->scale;
    }
  }
  float *dkbase = a->dk + b * a->dks.b + hk * a->dks.h, *dvbase = a->dv + b * a->dvs.b + hk * a->dvs.h;
  for (int j = 0; j < T; j++)
    for (int d = 0; d < D; d++) {
      dkbase[j * a->dks.t + d] = dkT[(long)d * Tp + j];
      dvbase[j * a->dvs.t + d] = dvT[(long)d * Tp + j];
    }
}

static args_t geometry(int B, int T, int H, int Hkv, int D, const long *strides, int grads, float scale) {
  args_t a = {0};
  a.B = B, a.T = T, a.H = H, a.Hkv = Hkv, a.D = D, a.scale = scale;
  a.Tp = (T + R + L - 1) / L * L; /* the last row block may reach past T */
  a.Dp = (D + L - 1) / L * L;
  a.qs = (strides_t){strides[0], strides[1], strides[2]};
  a.ks = (strides_t){strides[3], strides[4], strides[5]};
  a.vs = (strides_t){strides[6], strides[7], strides[8]};
  if (grads) {
    a.dqs = (strides_t){strides[9], strides[10], strides[11]};
    a.dks = (strides_t){strides[12], strides[13], strides[14]};
    a.dvs = (strides_t){strides[15], strides[16], strides[17]};
  }
  return a;
}

/* strides: (batch, position, head) of q, k, v (9 values), and for backward then of dq, dk, dv (18 in all). */
int lmlab_attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int B, int T,
                            int H, int Hkv, int D, const long *strides, float scale, int nthreads) {
  args_t a = geometry(B, T, H, Hkv, D, strides, 0, scale);
  a.q = q, a.k = k, a.v = v, a.out_w = out, a.lse_w = lse;
  size_t floats = (size_t)a.D * a.Tp + (size_t)a.Tp * a.Dp + (size_t)R * a.Tp + (size_t)R * a.Dp + (size_t)R * a.D;
  return for_each_job(&a, floats, nthreads, forward_job);
}

int lmlab_attention_backward(const float *q, const float *k, const float *v, const float *out, const float *dout,
                             const float *lse, float *dq, float *dk, float *dv, int B, int T, int H, int Hkv, int D,
                             const long *strides, float scale, int nthreads) {
  args_t a = geometry(B, T, H, Hkv, D, strides, 1, scale);
  a.q = q, a.k = k, a.v = v, a.out = out, a.dout = dout, a.lse = lse, a.dq = dq, a.dk = dk, a.dv = dv;
  size_t floats = (size_t)4 * a.D * a.Tp + (size_t)a.Tp * a.Dp + (size_t)R * a.Tp + (size_t)R * a.Dp +
                  (size_t)2 * R * a.D;
  return for_each_job(&a, floats, nthreads, backward_job);
}
