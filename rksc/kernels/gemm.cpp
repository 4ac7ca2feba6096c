// fp16- and int8-weight matrix products with fp32 arithmetic, for CPUs with AVX2, FMA and F16C.
//
//   y[M][N] = (x[M][K] . W[N][K]^T) * scale[N] (+ bias[N])    (scale, bias optional)
//
// W is held as fp16 (rksc_f16_gemm) or int8 (rksc_i8_gemm) in panels of 8 output columns: panel p is
// [K][8], P[p][k][j] = W[8p + j][k] (columns past N are zero); each weight is widened to fp32 exactly. Each output element is one fp32 FMA chain over k = 0 .. K-1, added to
// the bias at the end; which rows, columns, blocks and threads are computed together changes no bit
// of any element. So a row's result does not depend on the batch it is in, nor on the thread count.
//
// fp16: a row whose weights span more binades than fp16 holds exactly is kept as fp16 times a power of
// two, scale[n], applied to the finished chain (exact: a power of two changes no significant bit).
// int8: one step per 32 weights of a row (as llama.cpp's Q8_0 blocks): each group's chain is multiplied
// by its step and summed in group order, so the result still does not depend on the blocking.
//
// Blocking: R rows x C panels of accumulators in registers (R*C >= 6, so the FMA pipes stay busy);
// threads split the panels; for each group of panels every row block is run while the panels sit in
// L1/L2, so the weights come from memory once per call whatever M is.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline __m256 widen(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 widen(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#define LW(c) widen(w + (c) * ps + k * 8)
#define BX(r) _mm256_broadcast_ss(x + (r) * ldx + k)
#define FMA(a, b, c) a = _mm256_fmadd_ps(b, c, a)

static const int64_t QG = 32;  // int8 weights per step (along K)

static inline void put(float* y, __m256 v, const float* scale, const float* bias, int64_t ncols) {
    if (ncols <= 0) return;
    if (ncols >= 8) {
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
        _mm256_storeu_ps(y, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    for (int64_t j = 0; j < ncols; j++) {
        float u = scale ? t[j] * scale[j] : t[j];
        y[j] = bias ? u + bias[j] : u;
    }
}

// R rows x C panels (C == 1: R <= 8; C == 2: R <= 6; C == 4: R <= 2; C == 8: R == 1).
// GROUPED (int8): scale is [panels][ceil(K / QG)][8], one step per QG weights of a row: each group's chain
// is multiplied by its step and added, in group order, to the row's sum; otherwise scale is [N] per row.
template <int R, int C, typename W, bool GROUPED>
static __attribute__((noinline)) void block(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t K,
                  float* __restrict y, int64_t ldy, const float* scale, const float* bias, int64_t ncols) {
    const int64_t ps = K * 8;
    __m256 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
    auto chain = [&](int64_t k0, int64_t k1) __attribute__((always_inline)) {
        a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
        a9 = a0, a10 = a0, a11 = a0;
        for (int64_t k = k0; k < k1; k++) {
            if constexpr (C == 1) {
                __m256 w0 = LW(0);
                FMA(a0, BX(0), w0);
                if constexpr (R > 1) FMA(a1, BX(1), w0);
                if constexpr (R > 2) FMA(a2, BX(2), w0);
                if constexpr (R > 3) FMA(a3, BX(3), w0);
                if constexpr (R > 4) FMA(a4, BX(4), w0);
                if constexpr (R > 5) FMA(a5, BX(5), w0);
                if constexpr (R > 6) FMA(a6, BX(6), w0);
                if constexpr (R > 7) FMA(a7, BX(7), w0);
            } else if constexpr (C == 2) {
                __m256 w0 = LW(0), w1 = LW(1), b;
                b = BX(0); FMA(a0, b, w0); FMA(a1, b, w1);
                if constexpr (R > 1) { b = BX(1); FMA(a2, b, w0); FMA(a3, b, w1); }
                if constexpr (R > 2) { b = BX(2); FMA(a4, b, w0); FMA(a5, b, w1); }
                if constexpr (R > 3) { b = BX(3); FMA(a6, b, w0); FMA(a7, b, w1); }
                if constexpr (R > 4) { b = BX(4); FMA(a8, b, w0); FMA(a9, b, w1); }
                if constexpr (R > 5) { b = BX(5); FMA(a10, b, w0); FMA(a11, b, w1); }
            } else if constexpr (C == 4) {
                __m256 w0 = LW(0), w1 = LW(1), w2 = LW(2), w3 = LW(3), b;
                b = BX(0); FMA(a0, b, w0); FMA(a1, b, w1); FMA(a2, b, w2); FMA(a3, b, w3);
                if constexpr (R > 1) { b = BX(1); FMA(a4, b, w0); FMA(a5, b, w1); FMA(a6, b, w2); FMA(a7, b, w3); }
            } else {
                __m256 b = BX(0);
                FMA(a0, b, LW(0)); FMA(a1, b, LW(1)); FMA(a2, b, LW(2)); FMA(a3, b, LW(3));
                FMA(a4, b, LW(4)); FMA(a5, b, LW(5)); FMA(a6, b, LW(6)); FMA(a7, b, LW(7));
            }
        }
    };
    if constexpr (!GROUPED) {
        chain(0, K);
        const __m256 acc[12] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                put(y + r * ldy + c * 8, acc[r * C + c], scale ? scale + c * 8 : nullptr,
                    bias ? bias + c * 8 : nullptr, ncols - c * 8);
    } else {
        const int64_t G = (K + QG - 1) / QG, ss = G * 8;
        __m256 sum[R * C];
        for (int i = 0; i < R * C; i++) sum[i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            chain(g * QG, g * QG + QG < K ? g * QG + QG : K);
            const __m256 part[12] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++)
                    sum[r * C + c] = _mm256_fmadd_ps(part[r * C + c], _mm256_loadu_ps(scale + c * ss + g * 8),
                                                     sum[r * C + c]);
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                put(y + r * ldy + c * 8, sum[r * C + c], nullptr, bias ? bias + c * 8 : nullptr, ncols - c * 8);
    }
}

// R rows over panels [p0, p1)
template <int R, typename W, bool GROUPED>
static void rows(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy,
                 const float* scale, const float* bias, int64_t p0, int64_t p1, int64_t N) {
    constexpr int C = R == 1 ? 8 : R == 2 ? 4 : R <= 6 ? 2 : 1;
    const int64_t sp = GROUPED ? (K + QG - 1) / QG * 8 : 8;  // scale values per panel
    int64_t p = p0;
#define RUN(CC) block<R, CC, W, GROUPED>(x, ldx, w + p * K * 8, K, y + p * 8, ldy, scale ? scale + p * sp : nullptr, \
                                    bias ? bias + p * 8 : nullptr, N - p * 8)
    for (; p + C <= p1; p += C) RUN(C);
    if constexpr (C > 4) for (; p + 4 <= p1; p += 4) RUN(4);
    if constexpr (C > 2 && R <= 6) for (; p + 2 <= p1; p += 2) RUN(2);
    for (; p < p1; p++) RUN(1);
#undef RUN
}

template <typename W>
using rows_fn = void (*)(const float*, int64_t, const W*, int64_t, float*, int64_t, const float*, const float*,
                         int64_t, int64_t, int64_t);
template <typename W, bool G>
static const rows_fn<W> ROWS[9] = {nullptr, rows<1, W, G>, rows<2, W, G>, rows<3, W, G>, rows<4, W, G>,
                                   rows<5, W, G>, rows<6, W, G>, rows<7, W, G>, rows<8, W, G>};

static const int64_t GROUP = 8;  // panels per unit of work
static const int64_t MBLOCK = 60;  // rows whose inputs stay in cache while a group of panels is used

template <typename W, bool GROUPED>
static void gemm(const float* x, int64_t M, int64_t K, int64_t ldx, const W* w, int64_t N, const float* scale,
                 const float* bias, float* y, int64_t ldy, int threads) {
    const int64_t panels = (N + 7) / 8, groups = (panels + GROUP - 1) / GROUP;
    if (threads > groups) threads = (int)groups;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t g0 = groups * t / T, g1 = groups * (t + 1) / T;
        for (int64_t m0 = 0; m0 < M; m0 += MBLOCK) {
            const int64_t m1 = m0 + MBLOCK < M ? m0 + MBLOCK : M;
            for (int64_t g = g0; g < g1; g++) {
                const int64_t p0 = g * GROUP, p1 = p0 + GROUP < panels ? p0 + GROUP : panels;
                for (int64_t m = m0; m < m1;) {  // many rows: 6 at a time (6 x 2 panels); a few: up to 8
                    const int64_t left = m1 - m, r = left > 16 ? 6 : left < 8 ? left : 8;
                    ROWS<W, GROUPED>[r](x + m * ldx, ldx, w, K, y + m * ldy, ldy, scale, bias, p0, p1, N);
                    m += r;
                }
            }
        }
    }
}

extern "C" void rksc_f16_gemm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                              const float* scale, const float* bias, float* y, int64_t ldy, int threads) {
    gemm<uint16_t, false>(x, M, K, ldx, w, N, scale, bias, y, ldy, threads);
}

// scale: [ceil(N/8)][ceil(K/32)][8] steps, one per 32 weights of a row (required)
extern "C" void rksc_i8_gemm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, int64_t N,
                             const float* scale, const float* bias, float* y, int64_t ldy, int threads) {
    gemm<int8_t, true>(x, M, K, ldx, w, N, scale, bias, y, ldy, threads);
}

// Packing: panels[p][k][j] = fp16(w[8p + j][k] * inv_scale[8p + j]) (rows past N are zeros), from bf16 or fp32
// weights; returns how many weights have no exact fp16 value (then the caller scales rows by powers of two).
static inline __m256 load8(const uint16_t* w) {  // 8 bf16 -> fp32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w)), 16));
}
static inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
static inline float load1(const uint16_t* w) {
    uint32_t bits = (uint32_t)*w << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline float load1(const float* w) { return *w; }

template <typename T>
static int64_t pack(const T* w, int64_t N, int64_t K, const float* inv_scale, uint16_t* panels, int threads) {
    const int64_t P = (N + 7) / 8;
    int64_t inexact = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : inexact) schedule(static)
    for (int64_t p = 0; p < P; p++) {
        uint16_t* out = panels + p * K * 8;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++) {
                const int64_t n = p * 8 + j;
                r[j] = n < N ? load8(w + n * K + k) : _mm256_setzero_ps();
                if (n < N && inv_scale) r[j] = _mm256_mul_ps(r[j], _mm256_set1_ps(inv_scale[n]));
            }
            // transpose: c[i][j] = r[j][i]
            __m256 a0 = _mm256_unpacklo_ps(r[0], r[1]), a1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 a2 = _mm256_unpacklo_ps(r[2], r[3]), a3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 a4 = _mm256_unpacklo_ps(r[4], r[5]), a5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 a6 = _mm256_unpacklo_ps(r[6], r[7]), a7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
            __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
            __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
            __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
            const __m256 c[8] = {_mm256_permute2f128_ps(b0, b4, 0x20), _mm256_permute2f128_ps(b1, b5, 0x20),
                                 _mm256_permute2f128_ps(b2, b6, 0x20), _mm256_permute2f128_ps(b3, b7, 0x20),
                                 _mm256_permute2f128_ps(b0, b4, 0x31), _mm256_permute2f128_ps(b1, b5, 0x31),
                                 _mm256_permute2f128_ps(b2, b6, 0x31), _mm256_permute2f128_ps(b3, b7, 0x31)};
            for (int i = 0; i < 8; i++) {
                const __m128i h = _mm256_cvtps_ph(c[i], _MM_FROUND_TO_NEAREST_INT);
                const __m256 back = _mm256_cvtph_ps(h);
                inexact += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(back, c[i], _CMP_NEQ_UQ)));
                _mm_storeu_si128((__m128i*)(out + (k + i) * 8), h);
            }
        }
        for (; k < K; k++) {
            float v[8];
            for (int j = 0; j < 8; j++) {
                const int64_t n = p * 8 + j;
                v[j] = n < N ? load1(w + n * K + k) * (inv_scale ? inv_scale[n] : 1.0f) : 0.0f;
            }
            const __m256 x = _mm256_loadu_ps(v);
            const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
            inexact += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_cvtph_ps(h), x, _CMP_NEQ_UQ)));
            _mm_storeu_si128((__m128i*)(out + k * 8), h);
        }
    }
    return inexact;
}

extern "C" int64_t rksc_f16_pack_bf16(const uint16_t* w, int64_t N, int64_t K, const float* inv_scale,
                                      uint16_t* panels, int threads) {
    return pack(w, N, K, inv_scale, panels, threads);
}

extern "C" int64_t rksc_f16_pack_f32(const float* w, int64_t N, int64_t K, const float* inv_scale, uint16_t* panels,
                                     int threads) {
    return pack(w, N, K, inv_scale, panels, threads);
}
