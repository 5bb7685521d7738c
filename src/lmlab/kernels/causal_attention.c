/* Exact causal softmax attention for many small heads: float32, CPU, forward and backward.
 *
 * Built by lmlab/kernels/attention.py on first use (cc -O3 -march=native -fopenmp) and called through ctypes.
 * Why: for heads of width 4 (MU's block attention) torch's CPU flash kernel spends its time on per-tile GEMMs
 * whose inner dimension is 4; here each (batch, head) pair is one job that keeps its keys and values
 * transposed in L1 and runs every loop over key positions j in groups of L lanes, which the compiler
 * vectorises without reassociating any sum (no -ffast-math: NaN and Inf propagate as in IEEE arithmetic).
 *
 * Math (per batch b, head h, query i; s_ij = scale * q_i . k_j over j <= i):
 *   forward   m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i), o_i = sum_j exp(s_ij - m_i) v_j / l_i,
 *             lse_i = m_i + log l_i (kept for backward, as flash attention does)
 *   backward  p_ij = exp(s_ij - lse_i), delta_i = do_i . o_i, dv_j += p_ij do_i,
 *             ds_ij = p_ij (do_i . v_j - delta_i), dq_i = scale sum_j ds_ij k_j, dk_j += scale ds_ij q_i
 *
 * Layout: element (b, t, h, c) of qkv is qkv[b*sb + t*st + h*sh + c]; q is c = d, k is c = koff + d, v is
 * c = voff + d (d < D). out is [B, T, H, D] contiguous, lse [B, H, T]; dqkv has qkv's strides and every q, k, v
 * element of it is written. Each job is owned by one thread, so results do not depend on the thread count.
 * Returns 0, or 1 when a work buffer could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define L 16

/* e^x = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial (about 1 ulp); NaN stays NaN. */
static inline float exp_f32(float x) {
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x == x ? p * scale : x;
}

/* kT, vT [D][Tp]: the job's keys and values transposed, zero beyond T. */
static void gather_kv(const float *base, float *kT, float *vT, int T, int Tp, int D, long st, long koff,
                      long voff) {
  for (int d = 0; d < D; d++) {
    for (int j = 0; j < T; j++) {
      kT[(long)d * Tp + j] = base[j * st + koff + d];
      vT[(long)d * Tp + j] = base[j * st + voff + d];
    }
    for (int j = T; j < Tp; j++) kT[(long)d * Tp + j] = vT[(long)d * Tp + j] = 0.0f;
  }
}

/* s[j] = scale q . k_j for j < n (n: the lane groups holding 0..i). */
static void scores(const float *q, const float *kT, float *s, int n, int Tp, int D, float scale) {
  for (int j = 0; j < n; j++) s[j] = 0.0f;
  for (int d = 0; d < D; d++) {
    float qd = q[d] * scale;
    const float *k = kT + (long)d * Tp;
    for (int j = 0; j < n; j++) s[j] += qd * k[j];
  }
}

typedef struct {
  const float *qkv, *out, *dout, *lse;  /* inputs (out, dout: backward only) */
  float *out_w, *lse_w, *dqkv;          /* outputs of forward (out_w, lse_w) or backward (dqkv) */
  int T, H, D, Tp;
  long sb, st, sh, koff, voff;
  float scale;
} args_t;

/* Runs job(b, h) for every batch row and head, in parallel, each thread with its own work buffer of `floats`. */
static int for_each_head(const args_t *a, int B, size_t floats, int nthreads,
                         void (*job)(const args_t *, long, long, float *)) {
  int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
  {
    float *buffer = aligned_alloc(64, sizeof(float) * floats);
    failed = buffer == NULL;
#pragma omp for schedule(static)
    for (long j = 0; j < (long)B * a->H; j++)
      if (!failed) job(a, j / a->H, j % a->H, buffer);
    free(buffer);
  }
  return failed;
}

static void forward_job(const args_t *a, long b, long h, float *buffer) {
  int T = a->T, H = a->H, D = a->D, Tp = a->Tp;
  float *kT = buffer, *vT = kT + (size_t)Tp * D, *s = vT + (size_t)Tp * D;
  const float *base = a->qkv + b * a->sb + h * a->sh;
  gather_kv(base, kT, vT, T, Tp, D, a->st, a->koff, a->voff);
  for (int i = 0; i < T; i++) {
    int n = (i + L) / L * L;
    scores(base + i * a->st, kT, s, n, Tp, D, a->scale);
    float lane[L], m = -INFINITY, sum = 0.0f;
    for (int l = 0; l < L; l++) lane[l] = -INFINITY;
    for (int j0 = 0; j0 < n; j0 += L)
      for (int l = 0; l < L; l++) {
        float v = j0 + l <= i ? s[j0 + l] : -INFINITY;
        lane[l] = v > lane[l] ? v : lane[l];
      }
    for (int l = 0; l < L; l++) m = lane[l] > m ? lane[l] : m;
    for (int l = 0; l < L; l++) lane[l] = 0.0f;
    for (int j0 = 0; j0 < n; j0 += L)
      for (int l = 0; l < L; l++) {
        float p = j0 + l <= i ? exp_f32(s[j0 + l] - m) : 0.0f;
        s[j0 + l] = p;
        lane[l] += p;
      }
    for (int l = 0; l < L; l++) sum += lane[l];
    float *o = a->out_w + ((b * T + i) * H + h) * D;
    for (int d = 0; d < D; d++) {
      const float *v = vT + (long)d * Tp;
      float acc = 0.0f;
      for (int l = 0; l < L; l++) lane[l] = 0.0f;
      for (int j0 = 0; j0 < n; j0 += L)
        for (int l = 0; l < L; l++) lane[l] += s[j0 + l] * v[j0 + l];
      for (int l = 0; l < L; l++) acc += lane[l];
      o[d] = acc / sum;
    }
    a->lse_w[(b * H + h) * T + i] = m + logf(sum);
  }
}

static void backward_job(const args_t *a, long b, long h, float *buffer) {
  int T = a->T, H = a->H, D = a->D, Tp = a->Tp;
  float *kT = buffer, *vT = kT + (size_t)Tp * D, *dkT = vT + (size_t)Tp * D, *dvT = dkT + (size_t)Tp * D;
  float *p = dvT + (size_t)Tp * D, *ds = p + Tp;
  const float *base = a->qkv + b * a->sb + h * a->sh;
  float *dbase = a->dqkv + b * a->sb + h * a->sh;
  long st = a->st;
  gather_kv(base, kT, vT, T, Tp, D, st, a->koff, a->voff);
  memset(dkT, 0, sizeof(float) * (size_t)Tp * 2 * D);
  for (int i = 0; i < T; i++) {
    const float *q = base + i * st, *o = a->out + ((b * T + i) * H + h) * D;
    const float *go = a->dout + ((b * T + i) * H + h) * D;
    float delta = 0.0f, lse_i = a->lse[(b * H + h) * T + i];
    for (int d = 0; d < D; d++) delta += o[d] * go[d];
    int n = (i + L) / L * L;
    scores(q, kT, p, n, Tp, D, a->scale);
    for (int j0 = 0; j0 < n; j0 += L)
      for (int l = 0; l < L; l++) p[j0 + l] = j0 + l <= i ? exp_f32(p[j0 + l] - lse_i) : 0.0f;
    for (int j = 0; j < n; j++) ds[j] = 0.0f;
    for (int d = 0; d < D; d++) {
      float g = go[d];
      const float *v = vT + (long)d * Tp;
      float *dv = dvT + (long)d * Tp;
      for (int j = 0; j < n; j++) {
        ds[j] += g * v[j];
        dv[j] += p[j] * g;
      }
    }
    for (int j = 0; j < n; j++) ds[j] = p[j] * (ds[j] - delta) * a->scale;
    float *dq = dbase + i * st;
    for (int d = 0; d < D; d++) {
      const float *k = kT + (long)d * Tp;
      float *dk = dkT + (long)d * Tp, qd = q[d], lane[L], acc = 0.0f;
      for (int l = 0; l < L; l++) lane[l] = 0.0f;
      for (int j0 = 0; j0 < n; j0 += L)
        for (int l = 0; l < L; l++) {
          lane[l] += ds[j0 + l] * k[j0 + l];
          dk[j0 + l] += ds[j0 + l] * qd;
        }
      for (int l = 0; l < L; l++) acc += lane[l];
      dq[d] = acc;
    }
  }
  for (int d = 0; d < D; d++)
    for (int j = 0; j < T; j++) {
      dbase[j * st + a->koff + d] = dkT[(long)d * Tp + j];
      dbase[j * st + a->voff + d] = dvT[(long)d * Tp + j];
    }
}

int lmlab_causal_attention_forward(const float *qkv, float *out, float *lse, int B, int T, int H, int D, long sb,
                                   long st, long sh, long koff, long voff, float scale, int nthreads) {
  int Tp = (T + L - 1) / L * L;
  args_t a = {qkv, NULL, NULL, NULL, out, lse, NULL, T, H, D, Tp, sb, st, sh, koff, voff, scale};
  return for_each_head(&a, B, (size_t)Tp * (2 * D + 1), nthreads, forward_job);
}

int lmlab_causal_attention_backward(const float *qkv, const float *out, const float *dout, const float *lse,
                                    float *dqkv, int B, int T, int H, int D, long sb, long st, long sh, long koff,
                                    long voff, float scale, int nthreads) {
  int Tp = (T + L - 1) / L * L;
  args_t a = {qkv, out, dout, lse, NULL, NULL, dqkv, T, H, D, Tp, sb, st, sh, koff, voff, scale};
  return for_each_head(&a, B, (size_t)Tp * (4 * D + 2), nthreads, backward_job);
}
