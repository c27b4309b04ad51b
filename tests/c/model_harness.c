/* Drives a generated model (encode_query + decoder_step) teacher-forced.
 *
 * The header defines MODEL_WS_BYTES, MODEL_WS_ALIGN, MODEL_LOGITS_OFFSET, MODEL_VOCAB and the
 * entry points as MODEL_ENCODE / MODEL_STEP; with a multi-row step also MODEL_ROWS and
 * MODEL_MAX_ROWS.
 *
 * stdin: runs, then per run: cases, then per case: q ids..., steps, then per step:
 *   token n_print ids... n_allowed ids...
 * stdout, per step: "argmax argmax_allowed bits..." where bits are the printed logits as the
 * hex of their float32 bits (exact); with MODEL_ROWS then "rows <calls> <mismatches>": the case
 * again in multi-row steps of 1, 2, ..., MODEL_MAX_ROWS rows in turn, each call's tokens (with
 * the allowed list and without) and every logit of its last row compared with the one-row
 * steps'; then "end" after each case.
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

static int32_t *read_ids(size_t n) {
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) exit(3);
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)next_long();
    return ids;
}

int main(void) {
    size_t bytes = ((size_t)MODEL_WS_BYTES + MODEL_WS_ALIGN - 1) / MODEL_WS_ALIGN * MODEL_WS_ALIGN;
    uint8_t *ws = aligned_alloc(MODEL_WS_ALIGN, bytes);
    if (!ws) return 3;
    /* Garbage, not zeros: the model must not depend on a cleared workspace. */
    memset(ws, 0xA5, bytes);
    const float *logits = (const float *)(ws + MODEL_LOGITS_OFFSET);
    long cases = next_long();
    for (long c = 0; c < cases; c++) {
        size_t q = (size_t)next_long();
        int32_t *query = read_ids(q);
        MODEL_ENCODE(ws, query, q);
        long steps = next_long();
#ifdef MODEL_ROWS
        int32_t *tokens = malloc((size_t)(steps ? steps : 1) * sizeof *tokens);
        int32_t *bests = malloc((size_t)(steps ? steps : 1) * 2 * sizeof *bests);
        int32_t **alloweds = malloc((size_t)(steps ? steps : 1) * sizeof *alloweds);
        size_t *n_alloweds = malloc((size_t)(steps ? steps : 1) * sizeof *n_alloweds);
        float *all = malloc((size_t)(steps ? steps : 1) * MODEL_VOCAB * sizeof *all);
        if (!tokens || !bests || !alloweds || !n_alloweds || !all) return 3;
#endif
        for (long pos = 0; pos < steps; pos++) {
            int32_t token = (int32_t)next_long();
            size_t n_print = (size_t)next_long();
            int32_t *print = read_ids(n_print);
            size_t n_allowed = (size_t)next_long();
            int32_t *allowed = read_ids(n_allowed);
            /* The constrained call first: running the step again at the same position
             * rewrites the same cache row, so the unconstrained call's logits are the ones
             * printed. */
            int32_t best_allowed = MODEL_STEP(ws, token, (size_t)pos, allowed, n_allowed);
            int32_t best = MODEL_STEP(ws, token, (size_t)pos, NULL, 0);
            printf("%d %d", (int)best, (int)best_allowed);
            for (size_t i = 0; i < n_print; i++) {
                uint32_t u;
                if (print[i] < 0 || print[i] >= MODEL_VOCAB) return 4;
                memcpy(&u, &logits[print[i]], sizeof u);
                printf(" %08lx", (unsigned long)u);
            }
            printf("\n");
            free(print);
#ifdef MODEL_ROWS
            tokens[pos] = token;
            bests[2 * pos] = best;
            bests[2 * pos + 1] = best_allowed;
            alloweds[pos] = allowed;
            n_alloweds[pos] = n_allowed;
            memcpy(all + (size_t)pos * MODEL_VOCAB, logits, MODEL_VOCAB * sizeof *all);
#else
            free(allowed);
#endif
        }
#ifdef MODEL_ROWS
        {
            /* The same case in multi-row steps: the query again (state reset), then chunks. */
            MODEL_ENCODE(ws, query, q);
            long calls = 0, bad = 0;
            size_t k = 1;
            for (long pos = 0; pos < steps; pos += (long)k, k = k % MODEL_MAX_ROWS + 1) {
                if ((long)k > steps - pos) k = (size_t)(steps - pos);
                long last = pos + (long)k - 1;
                int32_t t_allowed = MODEL_ROWS(ws, tokens + pos, (size_t)pos, alloweds[last],
                                               n_alloweds[last], k);
                int32_t t = MODEL_ROWS(ws, tokens + pos, (size_t)pos, NULL, 0, k);
                calls++;
                if (t != bests[2 * last] || t_allowed != bests[2 * last + 1] ||
                    memcmp(logits, all + (size_t)last * MODEL_VOCAB, MODEL_VOCAB * sizeof *all) != 0)
                    bad++;
            }
            /* Bad calls are refused: no rows, too many, past the cache. */
            if (MODEL_ROWS(ws, tokens, 0, NULL, 0, 0) != -1) bad++;
            if (MODEL_ROWS(ws, tokens, 0, NULL, 0, MODEL_MAX_ROWS + 1) != -1) bad++;
            if (MODEL_ROWS(ws, tokens, MODEL_MAX_POSITIONS - 1, NULL, 0, 2) != -1) bad++;
            printf("rows %ld %ld\n", calls, bad);
            for (long pos = 0; pos < steps; pos++) free(alloweds[pos]);
            free(tokens);
            free(bests);
            free(alloweds);
            free(n_alloweds);
            free(all);
        }
#endif
        printf("end\n");
        free(query);
    }
    /* Out-of-range calls are refused, not run. */
    if (MODEL_STEP(ws, 1, (size_t)MODEL_MAX_POSITIONS, NULL, 0) != -1) return 5;
    if (MODEL_STEP(ws, MODEL_VOCAB, 0, NULL, 0) != -1) return 6;
    free(ws);
    return 0;
}
