/*
 * Runs the generated grammar (prefix gr_) over token sequences read from stdin and prints the
 * allowed set before every step, for tests/tests/codegen_grammar.rs.
 *
 * Input: records "n id_1 ... id_n" (decimal int32), until end of input, from the file named by
 * the first argument (a file, not a pipe: the output can be large, and a test that writes a
 * pipe before reading would then wait on us while we wait on it), else from stdin.
 * Output per record: n + 1 lines, the allowed set before each token and after the last one
 * ("all" when unconstrained, else the ids separated by spaces), then a line "--".
 *
 * Two machines, in separate parts of one buffer, are fed the same tokens in lockstep and must
 * agree at every step: the library keeps no state of its own, so they cannot interfere.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include HEADER

#define STRIDE (((GR_STATE_BYTES + GR_STATE_ALIGN - 1) / GR_STATE_ALIGN) * GR_STATE_ALIGN)

/* Aligned for any GR_STATE_ALIGN up to 16; the machines sit one stride apart. */
static _Alignas(16) uint8_t states[2 * STRIDE];

static int32_t *ids;
static size_t ids_cap;

static void fail(const char *what) {
    fprintf(stderr, "grammar_harness: %s\n", what);
    exit(1);
}

static void print_allowed(const int32_t *p, size_t n) {
    if (p == NULL) {
        if (n != 0) fail("NULL with a non-zero count");
        fputs("all\n", stdout);
        return;
    }
    if (n == 0) fail("a non-NULL empty allowed set");
    for (size_t i = 0; i < n; i++) {
        printf(i ? " %" PRId32 : "%" PRId32, p[i]);
    }
    putchar('\n');
}

static void step(uint8_t *a, uint8_t *b) {
    size_t na = 7, nb = 9;
    const int32_t *pa = gr_grammar_allowed(a, &na);
    const int32_t *pb = gr_grammar_allowed(b, &nb);
    if (pa != pb || na != nb) fail("two machines fed the same tokens disagree");
    /* A NULL count pointer is accepted and gives the same answer. */
    if (gr_grammar_allowed(a, NULL) != pa) fail("answer depends on the count pointer");
    print_allowed(pa, na);
}

int main(int argc, char **argv) {
    FILE *in = argc > 1 ? fopen(argv[1], "r") : stdin;
    if (in == NULL) fail("cannot open the input");
    uint8_t *a = states;
    uint8_t *b = states + STRIDE;
    long n;
    while (fscanf(in, "%ld", &n) == 1) {
        if (n < 0) fail("negative count");
        if ((size_t)n > ids_cap) {
            ids_cap = (size_t)n * 2;
            ids = realloc(ids, ids_cap * sizeof *ids);
            if (ids == NULL) fail("out of memory");
        }
        for (long i = 0; i < n; i++) {
            if (fscanf(in, "%" SCNd32, &ids[i]) != 1) fail("truncated record");
        }
        /* Dirty the buffers first: reset must set every field. */
        for (size_t i = 0; i < sizeof states; i++) states[i] = (uint8_t)(0xA5 ^ i);
        gr_grammar_reset(a);
        gr_grammar_reset(b);
        for (long i = 0; i < n; i++) {
            step(a, b);
            gr_grammar_feed(a, ids[i]);
            gr_grammar_feed(b, ids[i]);
        }
        step(a, b);
        puts("--");
    }
    if (in != stdin) fclose(in);
    free(ids);
    return 0;
}
