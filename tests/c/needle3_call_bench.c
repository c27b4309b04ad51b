/* Times a whole Needle 3 library (built with --name b3lib): NAME_call on one query, best of
 * REPEATS calls (each from query text to the answer: tokenizing, the query's prefill after the
 * folded prefix, greedy decoding, heads, rendering).
 * stdin: the query's bytes. stdout: "seconds generated_tokens status".
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

static uint8_t query[1 << 16];
static uint8_t out[B3LIB_MAX_OUTPUT_BYTES];

int main(void) {
    size_t n = fread(query, 1, sizeof query, stdin);
    uint8_t *ws = aligned_alloc(B3LIB_WORKSPACE_ALIGN, B3LIB_WORKSPACE_SIZE);
    if (!ws) return 3;
    memset(ws, 0, B3LIB_WORKSPACE_SIZE);
    double best = 1e30;
    b3lib_result r;
    int32_t st = 0;
    for (int i = 0; i < REPEATS; i++) {
        size_t len = 0;
        double t0 = now();
        st = b3lib_call_ex(ws, query, n, out, sizeof out, &len, &r);
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("%.6f %u %d\n", best, (unsigned)r.generated_tokens, (int)st);
    return 0;
}
