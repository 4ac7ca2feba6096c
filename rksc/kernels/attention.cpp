// Decode attention over the paged KV pool, fp32, for CPUs with AVX2 and FMA.
//
// For each row b (one new token) and query head j (KV head h = j / g):
//
//   out[b][j] = sum_i p_i V[slot(b, i)][h],  p = softmax_i(scale * q[b][j] . K[slot(b, i)][h])
//
// over the positions i in [lo_b, len_b), lo_b = max(0, len_b - window) (window 0: no window), where
// slot(b, i) = table[b][i / block_size] * block_size + i % block_size. A row's result depends only on
// its own context, taken in position order: not on the other rows, nor on which blocks they share,
// nor on the threads. Rows that share a prefix read the same K and V blocks, which stay in cache
// because each thread takes the rows of one KV head in turn.
//
// With `probs`, the normalised p of every head is written there too (the eviction policy reads it).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <vector>

static inline __m256 exp256(__m256 x) {  // Cephes-style expf, within 2 ulp; x <= 0 here
    const __m256 lo = _mm256_set1_ps(-87.3f);
    x = _mm256_max_ps(x, lo);
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

static inline __m256 sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {  // [sum(a0), ..., sum(a7)]
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

struct Pool {
    const float *k, *v;
    int64_t kv_heads, dim, block_size;
};

// the K rows k[0..n) (n <= 16; missing rows are zeros) as columns: kt[d][t] = k[t][d], 16 per d
static inline void transpose16(const float* const* k, int64_t n, int64_t dim, float* kt) {
    for (int half = 0; half < 2; half++)
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; t++) {
                const int64_t row = half * 8 + t;
                r[t] = row < n ? _mm256_loadu_ps(k[row] + d0) : _mm256_setzero_ps();
            }
            __m256 a0 = _mm256_unpacklo_ps(r[0], r[1]), a1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 a2 = _mm256_unpacklo_ps(r[2], r[3]), a3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 a4 = _mm256_unpacklo_ps(r[4], r[5]), a5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 a6 = _mm256_unpacklo_ps(r[6], r[7]), a7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
            __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
            __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
            __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
            float* o = kt + d0 * 16 + half * 8;
            _mm256_storeu_ps(o + 0 * 16, _mm256_permute2f128_ps(b0, b4, 0x20));
            _mm256_storeu_ps(o + 1 * 16, _mm256_permute2f128_ps(b1, b5, 0x20));
            _mm256_storeu_ps(o + 2 * 16, _mm256_permute2f128_ps(b2, b6, 0x20));
            _mm256_storeu_ps(o + 3 * 16, _mm256_permute2f128_ps(b3, b7, 0x20));
            _mm256_storeu_ps(o + 4 * 16, _mm256_permute2f128_ps(b0, b4, 0x31));
            _mm256_storeu_ps(o + 5 * 16, _mm256_permute2f128_ps(b1, b5, 0x31));
            _mm256_storeu_ps(o + 6 * 16, _mm256_permute2f128_ps(b2, b6, 0x31));
            _mm256_storeu_ps(o + 7 * 16, _mm256_permute2f128_ps(b3, b7, 0x31));
        }
}

static inline void put_scores(__m256 a, __m256 scale, float* s, int64_t n) {
    a = _mm256_mul_ps(a, scale);
    if (n >= 8) {
        _mm256_storeu_ps(s, a);
    } else if (n > 0) {
        float t8[8];
        _mm256_storeu_ps(t8, a);
        for (int64_t t = 0; t < n; t++) s[t] = t8[t];
    }
}

// scores of query heads q[0..m) (m <= 4, `qs` apart) against the 16 keys of kt: s[i][t] = scale * q_i . k_t,
// each one chain over d in order; 8 chains in flight keep the FMA pipes busy
static inline void score4(const float* q, int64_t qs, int64_t m, const float* kt, int64_t dim, float scale,
                          float* s, int64_t ss, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float *q0 = q, *q1 = q + (m > 1 ? qs : 0), *q2 = q + (m > 2 ? 2 * qs : 0), *q3 = q + (m > 3 ? 3 * qs : 0);
    for (int64_t d = 0; d < dim; d++) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * 16), k1 = _mm256_loadu_ps(kt + d * 16 + 8);
        __m256 x = _mm256_broadcast_ss(q0 + d);
        a0 = _mm256_fmadd_ps(x, k0, a0);
        b0 = _mm256_fmadd_ps(x, k1, b0);
        x = _mm256_broadcast_ss(q1 + d);
        a1 = _mm256_fmadd_ps(x, k0, a1);
        b1 = _mm256_fmadd_ps(x, k1, b1);
        x = _mm256_broadcast_ss(q2 + d);
        a2 = _mm256_fmadd_ps(x, k0, a2);
        b2 = _mm256_fmadd_ps(x, k1, b2);
        x = _mm256_broadcast_ss(q3 + d);
        a3 = _mm256_fmadd_ps(x, k0, a3);
        b3 = _mm256_fmadd_ps(x, k1, b3);
    }
    const __m256 sv = _mm256_set1_ps(scale);
    const __m256 lo[4] = {a0, a1, a2, a3}, hi[4] = {b0, b1, b2, b3};
    for (int64_t i = 0; i < m; i++) {
        put_scores(lo[i], sv, s + i * ss, n);
        put_scores(hi[i], sv, s + i * ss + 8, n - 8);
    }
}

static const int64_t CHUNK = 32;  // keys whose K (or V) rows stay in L1 while they are used

struct Row {  // one row's context for one KV head
    int64_t lo, n;  // positions [lo, lo + n)
    const float* q;  // its first query head of the group
    float* out;  // its first output head of the group
    float* probs;  // its first probability head of the group, or null
    size_t kv;  // offset of its K and V row pointers in the scratch
    size_t s;  // offset of its scores in the scratch
};

struct Scratch {
    std::vector<float> kt;  // 16 keys, transposed: [dim][16]
    std::vector<const float*> k, v;  // per row, the K and V row of each position
    std::vector<float> s;  // per row, g x (n + 8) scores, then softmax numerators
    std::vector<float> total;  // per row and head
};

// rows [r0, r1) over KV head h, chunk by chunk of key positions so that rows sharing a prefix
// read each chunk of its K and V from L1; a row's arithmetic is the same whatever rows are beside it
static void rows_head(const Pool& p, const float* q, int64_t q_row_stride, int64_t q_head_stride,
                      const int32_t* tables, int64_t table_stride, const int32_t* lengths, int64_t r0, int64_t r1,
                      int64_t window, int64_t h, int64_t g, float scale, float* out, int64_t out_row_stride,
                      float* probs, int64_t probs_row_stride, int64_t probs_head_stride, Scratch& w) {
    std::vector<Row> rows;
    size_t pointers = 0, scores = 0;
    int64_t longest = 0;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t len = lengths[r], lo = window > 0 && len > window ? len - window : 0, n = len - lo;
        rows.push_back({lo, n, q + r * q_row_stride + h * g * q_head_stride, out + r * out_row_stride + h * g * p.dim,
                        probs ? probs + r * probs_row_stride + h * g * probs_head_stride : nullptr, pointers, scores});
        pointers += n;
        scores += g * (n + 16);
        longest = n > longest ? n : longest;
    }
    w.k.resize(pointers);
    w.v.resize(pointers);
    w.s.resize(scores);
    w.total.resize(rows.size() * g);
    for (size_t i = 0; i < rows.size(); i++) {  // rows of K and V, in position order
        const Row& row = rows[i];
        const int32_t* table = tables + (r0 + (int64_t)i) * table_stride;
        for (int64_t t = 0, b = row.lo / p.block_size, o = row.lo % p.block_size; t < row.n; t++) {
            const int64_t at = (((int64_t)table[b] * p.block_size + o) * p.kv_heads + h) * p.dim;
            w.k[row.kv + t] = p.k + at;
            w.v[row.kv + t] = p.v + at;
            if (++o == p.block_size) o = 0, b++;
        }
    }
    w.kt.resize((size_t)p.dim * 16);
    const float* last[16] = {nullptr};  // the K rows in w.kt: rows that share them are not transposed again
    int64_t last_n = 0;
    for (int64_t c = 0; c < longest; c += 16)  // scores of every row and head, 16 keys at a time
        for (size_t i = 0; i < rows.size(); i++) {
            const Row& row = rows[i];
            if (c >= row.n) continue;
            const int64_t n = row.n - c < 16 ? row.n - c : 16;
            const float* const* k = w.k.data() + row.kv + c;
            bool same = n == last_n;
            for (int64_t t = 0; same && t < n; t++) same = k[t] == last[t];
            if (!same) {
                transpose16(k, n, p.dim, w.kt.data());
                for (int64_t t = 0; t < n; t++) last[t] = k[t];
                last_n = n;
            }
            for (int64_t j = 0; j < g; j += 4)
                score4(row.q + j * q_head_stride, q_head_stride, g - j < 4 ? g - j : 4, w.kt.data(), p.dim, scale,
                       w.s.data() + row.s + j * (row.n + 16) + c, row.n + 16, n);
        }
    for (size_t i = 0; i < rows.size(); i++) {  // softmax numerators, in place, and their sums
        const Row& row = rows[i];
        for (int64_t j = 0; j < g; j++) {
            float* s = w.s.data() + row.s + j * (row.n + 16);
            const int64_t n = row.n, full = n / 8 * 8;
            for (int64_t t = n; t < full + 8; t++) s[t] = -INFINITY;  // the tail's padding (room: n + 16)
            __m256 mv = _mm256_set1_ps(-INFINITY);
            for (int64_t t = 0; t < n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
            float m8[8];
            _mm256_storeu_ps(m8, mv);
            float m = m8[0];
            for (int u = 1; u < 8; u++) m = m8[u] > m ? m8[u] : m;
            mv = _mm256_set1_ps(m);
            __m256 sum = _mm256_setzero_ps();
            for (int64_t t = 0; t < n; t += 8) {
                __m256 x = _mm256_loadu_ps(s + t);
                const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);  // not padding
                __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(x, mv)), keep);
                _mm256_storeu_ps(s + t, e);
                sum = _mm256_add_ps(sum, e);
            }
            float s8[8];
            _mm256_storeu_ps(s8, sum);
            w.total[i * g + j] = ((s8[0] + s8[1]) + (s8[2] + s8[3])) + ((s8[4] + s8[5]) + (s8[6] + s8[7]));
            float* o = row.out + j * p.dim;
            for (int64_t d = 0; d < p.dim; d++) o[d] = 0.0f;
        }
    }
    for (int64_t c = 0; c < longest; c += CHUNK)  // o += sum_t p_t v_t, a chunk of keys at a time, in order
        for (size_t i = 0; i < rows.size(); i++) {
            const Row& row = rows[i];
            const int64_t e = c + CHUNK < row.n ? c + CHUNK : row.n;
            if (c >= e) continue;
            const float* const* v = w.v.data() + row.kv;
            for (int64_t j = 0; j < g; j++) {
                const float* s = w.s.data() + row.s + j * (row.n + 16);
                float* o = row.out + j * p.dim;
                for (int64_t d0 = 0; d0 < p.dim; d0 += 64) {
                    if (p.dim - d0 >= 64) {
                        __m256 a0 = _mm256_loadu_ps(o + d0), a1 = _mm256_loadu_ps(o + d0 + 8),
                               a2 = _mm256_loadu_ps(o + d0 + 16), a3 = _mm256_loadu_ps(o + d0 + 24),
                               a4 = _mm256_loadu_ps(o + d0 + 32), a5 = _mm256_loadu_ps(o + d0 + 40),
                               a6 = _mm256_loadu_ps(o + d0 + 48), a7 = _mm256_loadu_ps(o + d0 + 56);
                        for (int64_t t = c; t < e; t++) {
                            const __m256 pt = _mm256_set1_ps(s[t]);
                            const float* vr = v[t] + d0;
                            a0 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr), a0);
                            a1 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 8), a1);
                            a2 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 16), a2);
                            a3 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 24), a3);
                            a4 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 32), a4);
                            a5 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 40), a5);
                            a6 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 48), a6);
                            a7 = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 56), a7);
                        }
                        _mm256_storeu_ps(o + d0, a0); _mm256_storeu_ps(o + d0 + 8, a1);
                        _mm256_storeu_ps(o + d0 + 16, a2); _mm256_storeu_ps(o + d0 + 24, a3);
                        _mm256_storeu_ps(o + d0 + 32, a4); _mm256_storeu_ps(o + d0 + 40, a5);
                        _mm256_storeu_ps(o + d0 + 48, a6); _mm256_storeu_ps(o + d0 + 56, a7);
                    } else {
                        for (int64_t d = d0; d < p.dim; d += 8) {
                            __m256 a = _mm256_loadu_ps(o + d);
                            for (int64_t t = c; t < e; t++)
                                a = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(v[t] + d), a);
                            _mm256_storeu_ps(o + d, a);
                        }
                    }
                }
            }
        }
    for (size_t i = 0; i < rows.size(); i++) {
        const Row& row = rows[i];
        for (int64_t j = 0; j < g; j++) {
            const float total = w.total[i * g + j];
            float* o = row.out + j * p.dim;
            const __m256 tv = _mm256_set1_ps(total);
            for (int64_t d = 0; d < p.dim; d += 8) _mm256_storeu_ps(o + d, _mm256_div_ps(_mm256_loadu_ps(o + d), tv));
            if (row.probs) {
                const float* s = w.s.data() + row.s + j * (row.n + 16);
                float* pr = row.probs + j * probs_head_stride;
                for (int64_t t = 0; t < row.n; t++) pr[row.lo + t] = s[t] / total;
            }
        }
    }
}

extern "C" void rksc_decode_attention(const float* q, int64_t q_row_stride, int64_t q_head_stride, const float* k,
                                      const float* v, int64_t kv_heads, int64_t dim, const int32_t* tables,
                                      int64_t table_stride, const int32_t* lengths, int64_t rows, int64_t block_size,
                                      int64_t q_heads, float scale, int64_t window, float* out, int64_t out_row_stride,
                                      float* probs, int64_t probs_row_stride, int64_t probs_head_stride,
                                      int threads) {
    const Pool p{k, v, kv_heads, dim, block_size};
    const int64_t g = q_heads / kv_heads;
    // units of work: a KV head and a range of rows; each KV head's rows split into as many ranges as it
    // takes to give every thread work
    const int64_t parts = (threads + kv_heads - 1) / kv_heads < rows ? (threads + kv_heads - 1) / kv_heads : rows;
    const int64_t units = kv_heads * parts;
    if (threads > units) threads = (int)units;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        static thread_local Scratch w;  // kept between calls: no allocation (and page faults) per call
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        for (int64_t u = units * t / T; u < units * (t + 1) / T; u++) {
            const int64_t h = u / parts, part = u % parts;
            rows_head(p, q, q_row_stride, q_head_stride, tables, table_stride, lengths, rows * part / parts,
                      rows * (part + 1) / parts, window, h, g, scale, out, out_row_stride, probs, probs_row_stride,
                      probs_head_stride, w);
        }
    }
}
