/*
 * Times a library built by `needlec build --name needle`: `bench_harness QUERY REPEATS` runs
 * needle_call on QUERY REPEATS times in one workspace (after one warm-up call) and prints
 * "<best seconds> <generated tokens> <query tokens>" using the token-level entry for the counts.
 */
#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include HEADER

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s QUERY REPEATS\n", argv[0]);
        return 2;
    }
    const uint8_t *q = (const uint8_t *)argv[1];
    size_t qlen = strlen(argv[1]);
    int repeats = atoi(argv[2]);
    void *ws = NULL;
    if (posix_memalign(&ws, NEEDLE_WORKSPACE_ALIGN, NEEDLE_WORKSPACE_SIZE) != 0) return 2;
    uint8_t *out = malloc(NEEDLE_MAX_OUTPUT_BYTES);
    size_t len = 0;
    int32_t st = needle_call(ws, q, qlen, out, NEEDLE_MAX_OUTPUT_BYTES, &len);
    if (st != NEEDLE_OK) {
        fprintf(stderr, "status %d\n", (int)st);
        return 1;
    }
    double best = 1e30;
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        needle_call(ws, q, qlen, out, NEEDLE_MAX_OUTPUT_BYTES, &len);
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("%.9f\n", best);
    free(out);
    free(ws);
    return 0;
}
