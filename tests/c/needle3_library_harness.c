/* Drives a Needle 3 library built with --name n3lib through its C interface.
 *
 * stdin, one request a line:
 *   Q <hex of the query>      n3lib_call_ex, then n3lib_call on the same query
 *   T <n> <id>...             n3lib_call_tokens
 *   E <hex of the text>       n3lib_embed
 *   X                         the argument checks (one line of statuses)
 * stdout, one line a request:
 *   Q: status out_len out_hex conf_bits escalate parsed tool generated reasoning_len
 *      logit_bits router_bits x3 reasoning_hex same   (same: n3lib_call gave the same status
 *      and bytes; "-" for an empty hex string)
 *   T: status n ids...
 *   E: status bits...
 *   X: the statuses of the bad calls, then the model info's abi_version and generation
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include HEADER

static uint8_t *ws;
static uint8_t out[N3LIB_MAX_OUTPUT_BYTES + 1];
static uint8_t out2[N3LIB_MAX_OUTPUT_BYTES + 1];
static char line[1 << 17];
static uint8_t query[1 << 16];

static void hex(const uint8_t *p, size_t n) {
    if (n == 0) {
        printf(" -");
        return;
    }
    printf(" ");
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
}

static size_t unhex(const char *s, uint8_t *to) {
    size_t n = 0;
    while (s[0] && s[1] && s[0] != '\n' && s[0] != '-') {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1) break;
        to[n++] = (uint8_t)v;
        s += 2;
    }
    return n;
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

int main(void) {
    size_t bytes = (n3lib_workspace_size() + N3LIB_WORKSPACE_ALIGN - 1) / N3LIB_WORKSPACE_ALIGN *
                   N3LIB_WORKSPACE_ALIGN;
    if (bytes != (N3LIB_WORKSPACE_SIZE + N3LIB_WORKSPACE_ALIGN - 1) / N3LIB_WORKSPACE_ALIGN *
                     N3LIB_WORKSPACE_ALIGN)
        return 4;
    ws = aligned_alloc(N3LIB_WORKSPACE_ALIGN, bytes + N3LIB_WORKSPACE_ALIGN);
    if (!ws) return 3;
    /* Garbage, not zeros: the library must not depend on a cleared workspace. */
    memset(ws, 0xA5, bytes);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'Q') {
            size_t qn = unhex(line + 2, query);
            n3lib_result r;
            memset(&r, 0x5A, sizeof r);
            size_t n = 0;
            int32_t st = n3lib_call_ex(ws, query, qn, out, sizeof out, &n, &r);
            size_t rlen = 0;
            const uint8_t *reasoning = n3lib_reasoning(ws, &rlen);
            printf("%d %zu", (int)st, n);
            hex(out, st == 0 ? n : 0);
            printf(" %08lx %d %d %d %u %u %08lx %08lx %08lx %08lx", (unsigned long)bits(r.confidence),
                   (int)r.escalate, (int)r.parsed, (int)r.tool, (unsigned)r.generated_tokens,
                   (unsigned)r.reasoning_len, (unsigned long)bits(r.confidence_logit),
                   (unsigned long)bits(r.router[0]), (unsigned long)bits(r.router[1]),
                   (unsigned long)bits(r.router[2]));
            hex(reasoning ? reasoning : (const uint8_t *)"", reasoning ? rlen : 0);
            size_t n2 = 0;
            int32_t st2 = n3lib_call(ws, query, qn, out2, sizeof out2, &n2);
            int same = st2 == st && n2 == n && (st != 0 || memcmp(out, out2, n) == 0);
            printf(" %d\n", same);
        } else if (line[0] == 'T') {
            char *p = line + 2;
            long n = strtol(p, &p, 10);
            int32_t *ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *ids);
            int32_t gen[N3LIB_MAX_GEN_LEN];
            if (!ids) return 3;
            for (long i = 0; i < n; i++) ids[i] = (int32_t)strtol(p, &p, 10);
            size_t k = 0;
            int32_t st = n3lib_call_tokens(ws, ids, (size_t)n, gen, N3LIB_MAX_GEN_LEN, &k);
            printf("%d %zu", (int)st, k);
            for (size_t i = 0; i < k; i++) printf(" %d", (int)gen[i]);
            printf("\n");
            free(ids);
        } else if (line[0] == 'E') {
            size_t qn = unhex(line + 2, query);
            float e[N3LIB_EMBEDDING_DIM + 1];
            int32_t st = n3lib_embed(ws, query, qn, e);
            printf("%d", (int)st);
            for (size_t i = 0; st == 0 && i < (size_t)N3LIB_EMBEDDING_DIM; i++)
                printf(" %08lx", (unsigned long)bits(e[i]));
            printf("\n");
        } else if (line[0] == 'X') {
            size_t n = 7;
            n3lib_result r;
            const uint8_t q[] = "weather in Paris";
            const uint8_t bad[] = {0xff, 0xfe};
            int32_t one = 1, big = 1 << 30;
            printf("%d", (int)n3lib_call(NULL, q, 16, out, sizeof out, &n));
            printf(" %d", (int)n3lib_call(ws + 1, q, 16, out, sizeof out, &n));
            printf(" %d", (int)n3lib_call(ws, q, 16, out, sizeof out, NULL));
            printf(" %d", (int)n3lib_call(ws, NULL, 16, out, sizeof out, &n));
            printf(" %d", (int)n3lib_call_ex(ws, q, 16, out, sizeof out, &n, NULL));
            printf(" %d", (int)n3lib_call(ws, bad, 2, out, sizeof out, &n));
            printf(" %d", (int)n3lib_call(ws, query, N3LIB_MAX_QUERY_BYTES + 1, out, sizeof out, &n));
            printf(" %d", (int)n3lib_call_tokens(ws, &one, 0, (int32_t *)out, 4, &n));
            printf(" %d", (int)n3lib_call_tokens(ws, &big, 1, (int32_t *)out, 4, &n));
            /* A cap of 0: the size needed comes back. */
            int32_t st = n3lib_call_ex(ws, q, 16, out, 0, &n, &r);
            printf(" %d %d", (int)st, n > 0);
            n3lib_info info;
            n3lib_model_info(&info);
            printf(" %u %u\n", (unsigned)info.abi_version, (unsigned)info.generation);
        }
        fflush(stdout);
    }
    free(ws);
    return 0;
}
