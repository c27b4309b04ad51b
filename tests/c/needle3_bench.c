/* Times a generated Needle 3 step: the query's positions after the folded prefix (prefill),
 * then greedy decoding from the last one (decode), best of REPEATS runs each.
 *
 * The header defines N3_WS_BYTES, N3_WS_ALIGN, N3_FIRST and the entry points as N3_STEP and
 * N3_ROWS (with N3_MAX_ROWS): the query runs through the multi-row entry in calls of up to
 * N3_MAX_ROWS positions.
 * stdin: n ids... (the query's ids, positions N3_FIRST..), then the decode length.
 * stdout: "prefill_seconds decode_seconds last_token".
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include HEADER

#define REPEATS 5

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(void) {
    size_t bytes = ((size_t)N3_WS_BYTES + N3_WS_ALIGN - 1) / N3_WS_ALIGN * N3_WS_ALIGN;
    uint8_t *ws = aligned_alloc(N3_WS_ALIGN, bytes);
    if (!ws) return 3;
    memset(ws, 0, bytes);
    long n;
    if (scanf("%ld", &n) != 1 || n < 1) return 2;
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    if (!ids) return 3;
    for (long i = 0; i < n; i++) {
        long v;
        if (scanf("%ld", &v) != 1) return 2;
        ids[i] = (int32_t)v;
    }
    long decode;
    if (scanf("%ld", &decode) != 1) return 2;
    double best_prefill = 1e30, best_decode = 1e30;
    int32_t tok = 0;
    for (int r = 0; r < REPEATS; r++) {
        double t0 = now();
        for (long i = 0; i < n; i += N3_MAX_ROWS) {
            long rows = n - i < N3_MAX_ROWS ? n - i : N3_MAX_ROWS;
            tok = N3_ROWS(ws, &ids[i], (size_t)(N3_FIRST + i), (size_t)rows);
        }
        double t1 = now();
        for (long i = 0; i < decode; i++) tok = N3_STEP(ws, tok, (size_t)(N3_FIRST + n + i));
        double t2 = now();
        if (t1 - t0 < best_prefill) best_prefill = t1 - t0;
        if (t2 - t1 < best_decode) best_decode = t2 - t1;
        if (tok < 0) return 4;
    }
    printf("%.9f %.9f %d\n", best_prefill, best_decode, (int)tok);
    free(ids);
    free(ws);
    return 0;
}
