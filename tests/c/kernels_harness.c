/*
 * Test harness for the object built by compiler/tests/codegen_kernels.rs: needlec's inline exp
 * (nk_exp), its float64 logarithm (nk_ln) and an embedded table read through a local function
 * (nk_table).
 *
 * Usage: kernels_harness exp N < N floats | kernels_harness ln N < N floats | kernels_harness table N
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
        fprintf(stderr, "usage: kernels_harness exp|ln|table N [< input]\n");
        return 2;
    }
    k = argv[1];
    if (strcmp(k, "exp") == 0) {
        /* exp N: N floats in, N out (computed out of place, then in place). */
        size_t n;
        float *x, *y;
        need_args(argc, 3);
        n = read_size(argv[2]);
        x = read_floats(n);
        y = malloc((n ? n : 1) * sizeof *y);
        if (!y) {
            return 2;
        }
        nk_exp(x, y, n);
        nk_exp(x, x, n);
        if (n && memcmp(x, y, n * sizeof *x) != 0) {
            fprintf(stderr, "harness: in-place result differs\n");
            return 1;
        }
        print_floats(y, n);
        free(x);
        free(y);
    } else if (strcmp(k, "ln") == 0) {
        /* ln N: N floats in, 2N out (each result as a float and its remainder). */
        size_t n;
        float *x, *y;
        need_args(argc, 3);
        n = read_size(argv[2]);
        x = read_floats(n);
        y = malloc((n ? 2 * n : 1) * sizeof *y);
        if (!y) {
            return 2;
        }
        nk_ln(x, y, n);
        print_floats(y, 2 * n);
        free(x);
        free(y);
    } else if (strcmp(k, "table") == 0) {
        /* table N: entries 0..N-1 of the embedded table, N <= NK_TABLE_LEN. */
        size_t n, i;
        need_args(argc, 3);
        n = read_size(argv[2]);
        if (n > NK_TABLE_LEN) {
            fprintf(stderr, "harness: the table has %d entries\n", NK_TABLE_LEN);
            return 2;
        }
        for (i = 0; i < n; i++) {
            float v = nk_table(i);
            print_floats(&v, 1);
        }
    } else {
        fprintf(stderr, "harness: unknown command '%s'\n", k);
        return 2;
    }
    return 0;
}
