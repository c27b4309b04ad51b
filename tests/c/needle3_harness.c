/* Drives a generated Needle 3 step over one prompt, position by position.
 *
 * The header defines N3_WS_BYTES, N3_WS_ALIGN, N3_LOGITS_OFFSET, N3_VOCAB_OUT, N3_HEAD_FLOATS
 * and the entry points as N3_STEP and N3_HEADS.
 *
 * stdin: runs, then per run: start n ids... (positions start..start+n)
 * stdout, per position: "argmax bits..." with every logit as the hex of its float32 bits;
 * then "heads bits..." (the heads' outputs); then, with N3_ROWS, "rows <calls> <mismatches>":
 * the run again through the multi-row entry in calls of 1, 2, ..., N3_MAX_ROWS rows in turn,
 * each call's argmax and logits and the final heads compared with the one-row steps' bit for
 * bit; then "end".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include HEADER

static long next_long(void) {
    long v;
    if (scanf("%ld", &v) != 1) {
        fprintf(stderr, "bad input\n");
        exit(2);
    }
    return v;
}

int main(void) {
    size_t bytes = ((size_t)N3_WS_BYTES + N3_WS_ALIGN - 1) / N3_WS_ALIGN * N3_WS_ALIGN;
    uint8_t *ws = aligned_alloc(N3_WS_ALIGN, bytes);
    if (!ws) return 3;
    /* Garbage, not zeros: the model must not depend on a cleared workspace. */
    memset(ws, 0xA5, bytes);
    const float *logits = (const float *)(ws + N3_LOGITS_OFFSET);
    long runs = next_long();
    for (long r = 0; r < runs; r++) {
        long start = next_long();
        long n = next_long();
        int32_t *toks = malloc((size_t)(n ? n : 1) * sizeof *toks);
        int32_t *bests = malloc((size_t)(n ? n : 1) * sizeof *bests);
        float *all = malloc((size_t)(n ? n : 1) * N3_VOCAB_OUT * sizeof *all);
        if (!toks || !bests || !all) return 3;
        for (long pos = start; pos < start + n; pos++) {
            int32_t token = (int32_t)next_long();
            int32_t best = N3_STEP(ws, token, (size_t)pos);
            toks[pos - start] = token;
            bests[pos - start] = best;
            memcpy(&all[(size_t)(pos - start) * N3_VOCAB_OUT], logits, N3_VOCAB_OUT * sizeof *all);
            printf("%d", (int)best);
            for (size_t i = 0; i < N3_VOCAB_OUT; i++) {
                uint32_t u;
                memcpy(&u, &logits[i], sizeof u);
                printf(" %08lx", (unsigned long)u);
            }
            printf("\n");
        }
        float heads[N3_HEAD_FLOATS + 1];
        N3_HEADS(ws, heads);
        printf("heads");
        size_t n_heads = (size_t)N3_HEAD_FLOATS; /* a variable: 0 for a model without heads */
        for (size_t i = 0; i < n_heads; i++) {
            uint32_t u;
            memcpy(&u, &heads[i], sizeof u);
            printf(" %08lx", (unsigned long)u);
        }
        printf("\n");
#ifdef N3_ROWS
        {
            long calls = 0, bad = 0, size = 1;
            for (long i = 0; i < n; i += size, size = size % N3_MAX_ROWS + 1) {
                long rows = size < n - i ? size : n - i;
                int32_t best = N3_ROWS(ws, &toks[i], (size_t)(start + i), (size_t)rows);
                long last = i + rows - 1;
                calls++;
                if (best != bests[last] ||
                    memcmp(logits, &all[(size_t)last * N3_VOCAB_OUT], N3_VOCAB_OUT * sizeof *all))
                    bad++;
            }
            float again[N3_HEAD_FLOATS + 1];
            N3_HEADS(ws, again);
            if (memcmp(again, heads, n_heads * sizeof *heads)) bad++;
            /* Refused whole: no rows, too many, past the end. */
            if (N3_ROWS(ws, toks, (size_t)start, 0) != -1) bad++;
            if (N3_ROWS(ws, toks, (size_t)start, (size_t)N3_MAX_ROWS + 1) != -1) bad++;
            if (N3_ROWS(ws, toks, (size_t)N3_MAX_POSITIONS, 1) != -1) bad++;
            printf("rows %ld %ld\n", calls, bad);
        }
#endif
        free(toks);
        free(bests);
        free(all);
        printf("end\n");
    }
    /* Out of range: -1 and nothing computed. */
    if (N3_STEP(ws, 0, (size_t)N3_MAX_POSITIONS) != -1) return 5;
    if (N3_STEP(ws, -1, 0) != -1) return 6;
    free(ws);
    return 0;
}
