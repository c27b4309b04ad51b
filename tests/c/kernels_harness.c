/*
 * Test harness for needlec's generated kernels (compiler/tests/codegen_kernels.rs).
 *
 * Usage: kernels_harness KERNEL [ARGS...] < input
 * Floats travel as their IEEE-754 bit patterns in hex (8 digits), sizes as decimal, so that
 * nothing is lost to decimal conversion. Output: one token per line.
 *
 * The library under test (libkern.a) must link with nothing but this file; this file itself
 * may use libc.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"

static float read_float(void) {
    uint32_t bits;
    float f;
    if (scanf("%" SCNx32, &bits) != 1) {
        fprintf(stderr, "harness: expected a float (hex bits)\n");
        exit(2);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static size_t read_size(const char *s) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '\0' || *end != '\0') {
        fprintf(stderr, "harness: bad size '%s'\n", s);
        exit(2);
    }
    return (size_t)v;
}

static float *read_floats(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    size_t i;
    if (!p) {
        fprintf(stderr, "harness: out of memory\n");
        exit(2);
    }
    for (i = 0; i < n; i++) {
        p[i] = read_float();
    }
    return p;
}

static void print_floats(const float *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &p[i], sizeof bits);
        printf("%08" PRIx32 "\n", bits);
    }
}

static void need_args(int argc, int n) {
    if (argc != n) {
        fprintf(stderr, "harness: wrong number of arguments\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    const char *k;
    if (argc < 2) {
        fprintf(stderr, "usage: kernels_harness KERNEL [ARGS...] < input\n");
        return 2;
    }
    k = argv[1];
    if (strcmp(k, "exp") == 0 || strcmp(k, "sigmoid") == 0) {
        /* exp N / sigmoid N: N floats in, N out (computed out of place, then in place). */
        size_t n;
        float *x, *y;
        need_args(argc, 3);
        n = read_size(argv[2]);
        x = read_floats(n);
        y = malloc((n ? n : 1) * sizeof *y);
        if (!y) {
            return 2;
        }
        if (k[0] == 'e') {
            nk_exp(x, y, n);
            nk_exp(x, x, n);
        } else {
            nk_sigmoid(x, y, n);
            nk_sigmoid(x, x, n);
        }
        if (n && memcmp(x, y, n * sizeof *x) != 0) {
            fprintf(stderr, "harness: in-place result differs\n");
            return 1;
        }
        print_floats(y, n);
        free(x);
        free(y);
    } else if (strcmp(k, "softmax") == 0) {
        size_t rows, n;
        float *x;
        need_args(argc, 4);
        rows = read_size(argv[2]);
        n = read_size(argv[3]);
        x = read_floats(rows * n);
        nk_softmax(x, rows, n);
        print_floats(x, rows * n);
        free(x);
    } else if (strcmp(k, "argmax") == 0) {
        size_t n;
        float *x;
        need_args(argc, 3);
        n = read_size(argv[2]);
        x = read_floats(n);
        printf("%zu\n", nk_argmax(x, n));
        free(x);
    } else if (strcmp(k, "norm") == 0) {
        size_t rows;
        float *x, *y;
        need_args(argc, 3);
        rows = read_size(argv[2]);
        x = read_floats(rows * NK_NORM_D);
        y = malloc((rows ? rows : 1) * NK_NORM_D * sizeof *y);
        if (!y) {
            return 2;
        }
        nk_norm(x, y, rows);
        print_floats(y, rows * NK_NORM_D);
        free(x);
        free(y);
    } else if (strcmp(k, "matmul") == 0 || strcmp(k, "matmul16") == 0) {
        size_t rows, kk, nn;
        float *x, *y;
        int wide = strcmp(k, "matmul") == 0;
        need_args(argc, 3);
        rows = read_size(argv[2]);
        kk = wide ? NK_MM_K : NK_MM16_K;
        nn = wide ? NK_MM_N : NK_MM16_N;
        x = read_floats(rows * kk);
        y = malloc((rows ? rows : 1) * nn * sizeof *y);
        if (!y) {
            return 2;
        }
        if (wide) {
            nk_matmul(x, y, rows);
        } else {
            nk_matmul16(x, y, rows);
        }
        print_floats(y, rows * nn);
        free(x);
        free(y);
    } else if (strcmp(k, "rope") == 0) {
        size_t rows, pos0, n;
        float *x;
        int32_t rc;
        need_args(argc, 4);
        rows = read_size(argv[2]);
        pos0 = read_size(argv[3]);
        n = rows * NK_ROPE_HEADS * NK_ROPE_HEAD_DIM;
        x = read_floats(n);
        rc = nk_rope(x, rows, pos0);
        printf("%" PRId32 "\n", rc);
        print_floats(x, n);
        free(x);
    } else {
        fprintf(stderr, "harness: unknown kernel '%s'\n", k);
        return 2;
    }
    return 0;
}
