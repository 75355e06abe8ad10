/* Row-major matrix-vector products for CPU decode: moe_mpi.cpu._gemv.
 *
 * gemv(w, x, y, n, k, m): y[m, n] = x[m, k] @ w[n, k].T, float32, all three
 * C-contiguous (the Python side, moe_mpi/cpu/gemv.py, checks shapes and
 * dtypes). w is read once, front to back, whatever m is: each row of w is
 * dotted with every row of x while it is in L1.
 *
 * Why: decode reads every weight once per token, so its speed is how fast
 * one core streams memory. One sequential stream keeps the core's miss
 * queue full; OpenBLAS sgemv's several interleaved row streams do not, and
 * MLX's CPU matmul packs the matrix first (measured: docs/benchmarks.md,
 * examples/decode_kernels.py, examples/decode_ceiling.py).
 *
 * One row of x (batch-1 decode) reads STREAMS rows of w, a quarter of the
 * matrix apart, in the same pass, 64 bytes of each in turn, with software
 * prefetch ahead of each: a few concurrent streams read faster than one on
 * the machines we measured. Each row's sum is formed in the same order
 * either way, so results do not change.
 *
 * x86-64 picks an AVX-512 or AVX2+FMA loop at run time; elsewhere (and on
 * older x86) a plain loop the compiler vectorises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

/* Bytes ahead of the current position that the loops prefetch. Other
 * distances were no faster: the hardware prefetcher does most of the work
 * on one sequential stream. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 256
#endif

/* Rows of w read together when x has one row, and how far ahead each is
 * prefetched. More streams, or prefetching further ahead, were slower. */
#define STREAMS 4
#define STREAM_PREFETCH 512

static void gemv_plain(const float *w, const float *x, float *y, Py_ssize_t n, Py_ssize_t k,
                       Py_ssize_t m) {
    for (Py_ssize_t r = 0; r < n; r++) {
        const float *wr = w + r * k;
        for (Py_ssize_t t = 0; t < m; t++) {
            const float *xt = x + t * k;
            float s = 0.0f;
            for (Py_ssize_t j = 0; j < k; j++) s += wr[j] * xt[j];
            y[t * n + r] = s;
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86_DISPATCH 1

/* The row loop of both SIMD versions: each row of w against the rows of x,
 * 4 at a time; ROW(MB) is the body for MB rows. The row comes from memory
 * for the first 4 rows of x (`first`: prefetch) and from L1 after. */
#define GEMV_ROWS(ROW)                                  \
    for (Py_ssize_t r = 0; r < n; r++) {                \
        const float *wr = w + r * k;                    \
        for (Py_ssize_t b = 0; b < m; b += 4) {         \
            const float *xb = x + b * k;                \
            float *yb = y + b * n;                      \
            int first = b == 0;                         \
            switch (m - b) {                            \
                case 1: ROW(1); break;                  \
                case 2: ROW(2); break;                  \
                case 3: ROW(3); break;                  \
                default: ROW(4); break;                 \
            }                                           \
        }                                               \
    }

/* One row of w against up to 4 rows of x; MB is a literal so the
 * accumulators stay in registers. 2 accumulators per x row hide the FMA
 * latency. */
#define ROW_AVX512(MB)                                                              \
    do {                                                                            \
        __m512 a0[4], a1[4];                                                        \
        for (int t = 0; t < MB; t++) a0[t] = a1[t] = _mm512_setzero_ps();           \
        Py_ssize_t j = 0;                                                           \
        for (; j + 32 <= k; j += 32) {                                              \
            if (first) {                                                            \
                _mm_prefetch((const char *)(wr + j) + PREFETCH_BYTES, _MM_HINT_T0); \
                _mm_prefetch((const char *)(wr + j) + PREFETCH_BYTES + 64,          \
                             _MM_HINT_T0);                                          \
            }                                                                       \
            __m512 w0 = _mm512_loadu_ps(wr + j), w1 = _mm512_loadu_ps(wr + j + 16); \
            for (int t = 0; t < MB; t++) {                                          \
                a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + t * k + j), a0[t]); \
                a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + t * k + j + 16),    \
                                        a1[t]);                                     \
            }                                                                       \
        }                                                                           \
        for (; j < k; j += 16) { /* tail: masked loads */                           \
            __mmask16 mask = (__mmask16)((k - j >= 16) ? 0xFFFF                     \
                                                       : ((1u << (k - j)) - 1));    \
            __m512 w0 = _mm512_maskz_loadu_ps(mask, wr + j);                        \
            for (int t = 0; t < MB; t++)                                            \
                a0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, xb + t * k + j), \
                                        a0[t]);                                     \
        }                                                                           \
        for (int t = 0; t < MB; t++)                                                \
            yb[t * n + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));      \
    } while (0)

/* m == 1: rows r, r + part, r + 2 part, ... of w at once (STREAMS streams);
 * the accumulation per row is ROW_AVX512's. Returns the rows done. */
__attribute__((target("avx512f"))) static Py_ssize_t streams_avx512(const float *w,
                                                                   const float *x, float *y,
                                                                   Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t part = n / STREAMS;
    for (Py_ssize_t r = 0; r < part; r++) {
        __m512 a0[STREAMS], a1[STREAMS];
        const float *ws[STREAMS];
        for (int s = 0; s < STREAMS; s++) {
            a0[s] = a1[s] = _mm512_setzero_ps();
            ws[s] = w + (s * part + r) * k;
        }
        Py_ssize_t j = 0;
        for (; j + 32 <= k; j += 32) {
            __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
            for (int s = 0; s < STREAMS; s++) {
                _mm_prefetch((const char *)(ws[s] + j) + STREAM_PREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char *)(ws[s] + j) + STREAM_PREFETCH + 64, _MM_HINT_T0);
                a0[s] = _mm512_fmadd_ps(_mm512_loadu_ps(ws[s] + j), x0, a0[s]);
                a1[s] = _mm512_fmadd_ps(_mm512_loadu_ps(ws[s] + j + 16), x1, a1[s]);
            }
        }
        for (; j < k; j += 16) { /* tail: masked loads */
            __mmask16 mask = (__mmask16)((k - j >= 16) ? 0xFFFF : ((1u << (k - j)) - 1));
            __m512 x0 = _mm512_maskz_loadu_ps(mask, x + j);
            for (int s = 0; s < STREAMS; s++)
                a0[s] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, ws[s] + j), x0, a0[s]);
        }
        for (int s = 0; s < STREAMS; s++)
            y[s * part + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[s], a1[s]));
    }
    return part * STREAMS;
}

__attribute__((target("avx512f"))) static void gemv_avx512(const float *w, const float *x,
                                                           float *y, Py_ssize_t n,
                                                           Py_ssize_t k, Py_ssize_t m) {
    if (m == 1) { /* the rows left over after the streams: one at a time */
        Py_ssize_t done = streams_avx512(w, x, y, n, k);
        w += done * k;
        y += done;
        n -= done;
    }
    GEMV_ROWS(ROW_AVX512);
}

static inline float hsum256(__m256 v) __attribute__((target("avx2,fma")));
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#define ROW_AVX2(MB)                                                                \
    do {                                                                            \
        __m256 a0[4], a1[4];                                                        \
        for (int t = 0; t < MB; t++) a0[t] = a1[t] = _mm256_setzero_ps();           \
        Py_ssize_t j = 0;                                                           \
        for (; j + 16 <= k; j += 16) {                                              \
            if (first) _mm_prefetch((const char *)(wr + j) + PREFETCH_BYTES, _MM_HINT_T0); \
            __m256 w0 = _mm256_loadu_ps(wr + j), w1 = _mm256_loadu_ps(wr + j + 8);  \
            for (int t = 0; t < MB; t++) {                                          \
                a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + t * k + j), a0[t]); \
                a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + t * k + j + 8), a1[t]); \
            }                                                                       \
        }                                                                           \
        for (int t = 0; t < MB; t++) {                                              \
            float s = hsum256(_mm256_add_ps(a0[t], a1[t]));                         \
            for (Py_ssize_t i = j; i < k; i++) s += wr[i] * xb[t * k + i];          \
            yb[t * n + r] = s;                                                      \
        }                                                                           \
    } while (0)

/* streams_avx512 for AVX2: the accumulation per row is ROW_AVX2's. */
__attribute__((target("avx2,fma"))) static Py_ssize_t streams_avx2(const float *w,
                                                                  const float *x, float *y,
                                                                  Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t part = n / STREAMS;
    for (Py_ssize_t r = 0; r < part; r++) {
        __m256 a0[STREAMS], a1[STREAMS];
        const float *ws[STREAMS];
        for (int s = 0; s < STREAMS; s++) {
            a0[s] = a1[s] = _mm256_setzero_ps();
            ws[s] = w + (s * part + r) * k;
        }
        Py_ssize_t j = 0;
        for (; j + 16 <= k; j += 16) {
            __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
            for (int s = 0; s < STREAMS; s++) {
                _mm_prefetch((const char *)(ws[s] + j) + STREAM_PREFETCH, _MM_HINT_T0);
                a0[s] = _mm256_fmadd_ps(_mm256_loadu_ps(ws[s] + j), x0, a0[s]);
                a1[s] = _mm256_fmadd_ps(_mm256_loadu_ps(ws[s] + j + 8), x1, a1[s]);
            }
        }
        for (int s = 0; s < STREAMS; s++) {
            float t = hsum256(_mm256_add_ps(a0[s], a1[s]));
            for (Py_ssize_t i = j; i < k; i++) t += ws[s][i] * x[i];
            y[s * part + r] = t;
        }
    }
    return part * STREAMS;
}

__attribute__((target("avx2,fma"))) static void gemv_avx2(const float *w, const float *x,
                                                         float *y, Py_ssize_t n, Py_ssize_t k,
                                                         Py_ssize_t m) {
    if (m == 1) { /* the rows left over after the streams: one at a time */
        Py_ssize_t done = streams_avx2(w, x, y, n, k);
        w += done * k;
        y += done;
        n -= done;
    }
    GEMV_ROWS(ROW_AVX2);
}
#endif

typedef void (*gemv_fn)(const float *, const float *, float *, Py_ssize_t, Py_ssize_t,
                        Py_ssize_t);
static gemv_fn gemv_impl = gemv_plain;
static const char *gemv_isa = "plain";

static PyObject *gemv(PyObject *self, PyObject *args) {
    Py_buffer w, x, y;
    Py_ssize_t n, k, m;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn", &w, &x, &y, &n, &k, &m)) return NULL;
    PyObject *result = NULL;
    size_t f = sizeof(float);
    if (n < 0 || k < 0 || m < 0) {
        PyErr_Format(PyExc_ValueError, "gemv: negative size n=%zd k=%zd m=%zd", n, k, m);
    } else if ((size_t)w.len < (size_t)n * k * f || (size_t)x.len < (size_t)m * k * f ||
               (size_t)y.len < (size_t)m * n * f) {
        PyErr_Format(PyExc_ValueError,
                     "gemv: buffers of %zd, %zd, %zd bytes are too small for n=%zd k=%zd m=%zd",
                     w.len, x.len, y.len, n, k, m);
    } else {
        Py_BEGIN_ALLOW_THREADS
        gemv_impl((const float *)w.buf, (const float *)x.buf, (float *)y.buf, n, k, m);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return result;
}

/* read(a): the float32 sum of a buffer, read once front to back: a
 * read-only memory probe (moe_mpi.bench.roofline.stream_read, the "read"
 * kernel of examples/decode_ceiling.py), not a decode kernel. Decode only
 * reads its weights; this is the fastest way we found to read memory
 * once, doing nothing else: one sequential stream, 16 partial sums (the
 * compiler vectorises them), prefetch 2 KiB ahead. */
#define READ_PREFETCH 2048

static float read_sum(const float *a, Py_ssize_t n) {
    float s[16] = {0};
    Py_ssize_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __builtin_prefetch((const char *)(a + j) + READ_PREFETCH);
        for (int i = 0; i < 16; i++) s[i] += a[j + i];
    }
    float t = 0.0f;
    for (; j < n; j++) t += a[j];
    for (int i = 0; i < 16; i++) t += s[i];
    return t;
}

static PyObject *read_buf(PyObject *self, PyObject *args) {
    Py_buffer a;
    if (!PyArg_ParseTuple(args, "y*", &a)) return NULL;
    float t;
    Py_BEGIN_ALLOW_THREADS
    t = read_sum((const float *)a.buf, a.len / (Py_ssize_t)sizeof(float));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    return PyFloat_FromDouble(t);
}

/* Makes `isa` ("avx512f", "avx2", "plain") the loop in use if this CPU and
 * build run it; returns whether it did. */
static int select_isa(const char *isa) {
    gemv_fn impl = NULL;
    const char *name = NULL; /* a literal: `isa` may not outlive the call */
    if (strcmp(isa, "plain") == 0) {
        impl = gemv_plain;
        name = "plain";
    }
#ifdef HAVE_X86_DISPATCH
    else if (strcmp(isa, "avx512f") == 0 && __builtin_cpu_supports("avx512f")) {
        impl = gemv_avx512;
        name = "avx512f";
    } else if (strcmp(isa, "avx2") == 0 && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma")) {
        impl = gemv_avx2;
        name = "avx2";
    }
#endif
    if (impl == NULL) return 0;
    gemv_impl = impl;
    gemv_isa = name;
    return 1;
}

/* use(isa): pick a loop this CPU runs; for tests. */
static PyObject *use(PyObject *self, PyObject *args) {
    const char *isa;
    if (!PyArg_ParseTuple(args, "s", &isa)) return NULL;
    if (select_isa(isa)) Py_RETURN_NONE;
    PyErr_Format(PyExc_ValueError, "gemv: this CPU or build has no %s loop", isa);
    return NULL;
}

static PyObject *isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(gemv_isa); }

static PyMethodDef methods[] = {
    {"gemv", gemv, METH_VARARGS,
     "gemv(w, x, y, n, k, m): y[m, n] = x[m, k] @ w[n, k].T for C-contiguous float32 "
     "buffers."},
    {"read", read_buf, METH_VARARGS,
     "read(a): the float32 sum of a contiguous float32 buffer, read once (a memory probe)."},
    {"use", use, METH_VARARGS, "use(isa): run the 'avx512f', 'avx2' or 'plain' loop."},
    {"isa", isa, METH_NOARGS, "The loop in use: 'avx512f', 'avx2' or 'plain'."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gemv",
                                    "Row-major float32 matrix-vector products (decode).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__gemv(void) {
#ifdef HAVE_X86_DISPATCH
    __builtin_cpu_init();
#endif
    /* The fastest loop this CPU runs; "plain" is the default. */
    if (!select_isa("avx512f")) select_isa("avx2");
    return PyModule_Create(&module);
}
