/*
 * Runs the generated strict grammar (prefix gr_) over token sequences and prints the allowed
 * set before every step, for tests/tests/codegen_grammar.rs.
 *
 * Input (a file named by the first argument, else stdin): records "budget n id_1 ... id_n"
 * (decimal); budget -1: no budget (SIZE_MAX), else the step before token i (0-based) passes
 * remaining = max(budget - i, 0).
 * Output per record: n + 1 lines, the allowed set before each token and after the last one
 * ("all" when NULL, else the ids separated by spaces), then a line "--".
 *
 * Two machines in one buffer are fed the same tokens in lockstep and must agree (as lists: the
 * answer may point into either state block) at every step.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include HEADER

#define STRIDE (((GR_STATE_BYTES + GR_STATE_ALIGN - 1) / GR_STATE_ALIGN) * GR_STATE_ALIGN)

static _Alignas(16) uint8_t states[2 * STRIDE];

static int32_t *ids;
static size_t ids_cap;

static void fail(const char *what) {
    fprintf(stderr, "strict_harness: %s\n", what);
    exit(1);
}

static void step(uint8_t *a, uint8_t *b, size_t remaining) {
    size_t na = 7, nb = 9;
    const int32_t *pa = gr_grammar_allowed(a, &na, remaining);
    const int32_t *pb = gr_grammar_allowed(b, &nb, remaining);
    if (na != nb || (pa == NULL) != (pb == NULL)) fail("two machines disagree");
    if (pa != NULL && memcmp(pa, pb, na * sizeof *pa) != 0) fail("two machines disagree");
    if (pa == NULL) {
        if (na != 0) fail("NULL with a non-zero count");
        fputs("all\n", stdout);
        return;
    }
    if (na == 0) fail("a non-NULL empty allowed set");
    for (size_t i = 0; i < na; i++) printf(i ? " %" PRId32 : "%" PRId32, pa[i]);
    putchar('\n');
}

int main(int argc, char **argv) {
    FILE *in = argc > 1 ? fopen(argv[1], "r") : stdin;
    if (in == NULL) fail("cannot open the input");
    uint8_t *a = states;
    uint8_t *b = states + STRIDE;
    long budget, n;
    while (fscanf(in, "%ld %ld", &budget, &n) == 2) {
        if (n < 0) fail("negative count");
        if ((size_t)n > ids_cap) {
            ids_cap = (size_t)n * 2;
            ids = realloc(ids, ids_cap * sizeof *ids);
            if (ids == NULL) fail("out of memory");
        }
        for (long i = 0; i < n; i++) {
            if (fscanf(in, "%" SCNd32, &ids[i]) != 1) fail("truncated record");
        }
        /* Dirty the buffers first: reset must set up everything it relies on. */
        for (size_t i = 0; i < sizeof states; i++) states[i] = (uint8_t)(0xA5 ^ i);
        gr_grammar_reset(a);
        gr_grammar_reset(b);
        for (long i = 0; i <= n; i++) {
            size_t remaining = budget < 0 ? SIZE_MAX : (size_t)(budget > i ? budget - i : 0);
            step(a, b, remaining);
            if (i == n) break;
            gr_grammar_feed(a, ids[i]);
            gr_grammar_feed(b, ids[i]);
        }
        puts("--");
    }
    if (in != stdin) fclose(in);
    free(ids);
    return 0;
}
