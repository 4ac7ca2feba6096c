// The small fp32 operations of a decoder layer, one call each instead of a dozen torch ops, for CPUs
// with AVX2 and FMA. Rows are independent and each is computed in a fixed order, so a row's result
// does not depend on the batch it is in nor on the thread count.
//
//   rms_norm:      out = x * (1 / sqrt(mean(x^2) + eps)) * (w + offset)       (offset 1: Gemma's norm)
//   add_rms_norm:  sum = x + y; out = rms_norm(sum)
//   rope:          rotary embedding of the q and k heads of a fused qkv row, in place
//   silu_mul:      out = silu(gate) * up, from a fused [gate | up] row
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline __m256 exp256(__m256 x) {  // Cephes-style expf, within 2 ulp
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 v) {  // lanes added in a fixed order
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

static inline int threads_for(int64_t work, int threads) {  // below ~32k elements one thread is faster
    return work < 32768 ? 1 : threads;
}

static void norm_row(const float* x, int64_t n, const float* w, float offset, float eps, float* out) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        s = _mm256_fmadd_ps(v, v, s);
    }
    float total = hsum(s);
    for (; i < n; i++) total += x[i] * x[i];
    const float inv = 1.0f / sqrtf(total / (float)n + eps);
    const __m256 iv = _mm256_set1_ps(inv), off = _mm256_set1_ps(offset);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv),
                                                _mm256_add_ps(_mm256_loadu_ps(w + i), off)));
    for (; i < n; i++) out[i] = x[i] * inv * (w[i] + offset);
}

extern "C" void rksc_rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float offset, float eps,
                              float* out, int threads) {
#pragma omp parallel for num_threads(threads_for(rows * n, threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * n, n, w, offset, eps, out + r * n);
}

extern "C" void rksc_add_rms_norm(const float* x, const float* y, int64_t rows, int64_t n, const float* w,
                                  float offset, float eps, float* sum, float* out, int threads) {
#pragma omp parallel for num_threads(threads_for(rows * n, threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *a = x + r * n, *b = y + r * n;
        float* s = sum + r * n;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
        for (; i < n; i++) s[i] = a[i] + b[i];
        norm_row(s, n, w, offset, eps, out + r * n);
    }
}

// qkv rows [rows][(hq + 2 hk) * d]: the first hq + hk heads rotated by cos, sin [rows][d] (half-split
// rotation: x1' = x1 c1 - x2 s1, x2' = x2 c2 + x1 s2 for the two halves)
extern "C" void rksc_rope(float* qkv, int64_t rows, int64_t stride, int64_t heads, int64_t d, const float* cos,
                          const float* sin, int threads) {
    const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads_for(rows * heads * d, threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * d, *s = sin + r * d;
        for (int64_t h = 0; h < heads; h++) {
            float* x = qkv + r * stride + h * d;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
                _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                                     _mm256_mul_ps(x2, _mm256_loadu_ps(s + i))));
                _mm256_storeu_ps(x + half + i, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                                            _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i))));
            }
            for (; i < half; i++) {
                const float x1 = x[i], x2 = x[half + i];
                x[i] = x1 * c[i] - x2 * s[i];
                x[half + i] = x2 * c[half + i] + x1 * s[half + i];
            }
        }
    }
}

// out[r][i] = silu(gu[r][i]) * gu[r][n + i], silu(g) = g / (1 + exp(-g))
extern "C" void rksc_silu_mul(const float* gu, int64_t rows, int64_t n, float* out, int threads) {
#pragma omp parallel for num_threads(threads_for(rows * n, threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * n, *u = g + n;
        float* o = out + r * n;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                               exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
        }
        for (; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
