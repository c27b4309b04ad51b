/* Drives a generated model (encode_query + decoder_step) teacher-forced.
 *
 * The header defines MODEL_WS_BYTES, MODEL_WS_ALIGN, MODEL_LOGITS_OFFSET, MODEL_VOCAB and the
 * entry points as MODEL_ENCODE / MODEL_STEP.
 *
 * stdin: runs, then per run: cases, then per case: q ids..., steps, then per step:
 *   token n_print ids... n_allowed ids...
 * stdout, per step: "argmax argmax_allowed bits..." where bits are the printed logits as the
 * hex of their float32 bits (exact), then "end" after each case.
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
            free(allowed);
        }
        printf("end\n");
        free(query);
    }
    /* Out-of-range calls are refused, not run. */
    if (MODEL_STEP(ws, 1, (size_t)MODEL_MAX_POSITIONS, NULL, 0) != -1) return 5;
    if (MODEL_STEP(ws, MODEL_VOCAB, 0, NULL, 0) != -1) return 6;
    free(ws);
    return 0;
}
