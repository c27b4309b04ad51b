/*
 * End-to-end harness for a library built by `needlec build --name needle`.
 *
 *   library_harness answer     reads queries from stdin (each: 4-byte little-endian length, then
 *                              the bytes) and prints, per query, "<status> <hex of the output>"
 *   library_harness contracts  checks the C interface's contracts and prints "ok" lines
 *   library_harness threads    answers every query on stdin from 4 threads at once, each with its
 *                              own workspace, and prints the outputs of thread 0 as `answer` does
 *   library_harness steps      answers every query on stdin and prints, per query, "<status>
 *                              <forced> <sparse> <full> <multi-row steps> <multi-row calls>": the
 *                              decoder steps of the call by what they computed, and how many of
 *                              the forced ones ran in how many multi-row steps, from the five
 *                              uint32_t the library leaves in the last 64 bytes of the workspace
 *   library_harness ex         answers every query on stdin with needle_call and needle_call_ex
 *                              (checking they give the same status and bytes) and prints, per
 *                              query, "<status> <confidence> <escalate> <tool> <parsed>
 *                              <choice_steps> <hex of the output>"
 */
#define _POSIX_C_SOURCE 200112L
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include HEADER

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "contract failed at line %d: %s\n", __LINE__, #cond); \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

typedef struct {
    uint8_t *bytes;
    size_t len;
} query_t;

static query_t *read_queries(size_t *count) {
    size_t cap = 16, n = 0;
    query_t *qs = malloc(cap * sizeof *qs);
    unsigned char hdr[4];
    while (fread(hdr, 1, 4, stdin) == 4) {
        size_t len = (size_t)hdr[0] | (size_t)hdr[1] << 8 | (size_t)hdr[2] << 16 | (size_t)hdr[3] << 24;
        uint8_t *b = malloc(len + 1);
        if (len && fread(b, 1, len, stdin) != len) {
            fprintf(stderr, "short query\n");
            exit(2);
        }
        if (n == cap) {
            cap *= 2;
            qs = realloc(qs, cap * sizeof *qs);
        }
        qs[n].bytes = b;
        qs[n].len = len;
        n++;
    }
    *count = n;
    return qs;
}

static void *new_workspace(void) {
    void *ws = NULL;
    if (posix_memalign(&ws, NEEDLE_WORKSPACE_ALIGN, NEEDLE_WORKSPACE_SIZE) != 0) {
        fprintf(stderr, "no memory\n");
        exit(2);
    }
    return ws;
}

static void print_result(int32_t status, const uint8_t *out, size_t len) {
    printf("%d ", (int)status);
    for (size_t i = 0; i < len; i++) printf("%02x", out[i]);
    printf("\n");
}

typedef struct {
    query_t *qs;
    size_t n;
    uint8_t **outs;
    size_t *lens;
    int32_t *statuses;
} job_t;

static void *run_job(void *arg) {
    job_t *job = arg;
    void *ws = new_workspace();
    for (size_t i = 0; i < job->n; i++) {
        job->outs[i] = malloc(NEEDLE_MAX_OUTPUT_BYTES);
        job->statuses[i] = needle_call(ws, job->qs[i].bytes, job->qs[i].len, job->outs[i],
                                       NEEDLE_MAX_OUTPUT_BYTES, &job->lens[i]);
    }
    free(ws);
    return NULL;
}

static job_t new_job(query_t *qs, size_t n) {
    job_t j = {qs, n, calloc(n + 1, sizeof(uint8_t *)), calloc(n + 1, sizeof(size_t)),
               calloc(n + 1, sizeof(int32_t))};
    return j;
}

static int contracts(void) {
    static const uint8_t q[] = "What's the weather in Paris?";
    size_t qlen = sizeof q - 1;
    uint8_t out[NEEDLE_MAX_OUTPUT_BYTES];
    size_t len = 12345;
    void *ws = new_workspace();

    CHECK(needle_workspace_size() == NEEDLE_WORKSPACE_SIZE);
    /* NULL and misaligned workspaces. */
    CHECK(needle_call(NULL, q, qlen, out, sizeof out, &len) == NEEDLE_ERR_WORKSPACE);
    CHECK(needle_call((uint8_t *)ws + 1, q, qlen, out, sizeof out, &len) == NEEDLE_ERR_WORKSPACE);
    CHECK(needle_call((uint8_t *)ws + NEEDLE_WORKSPACE_ALIGN / 2, q, qlen, out, sizeof out, &len) ==
          NEEDLE_ERR_WORKSPACE);
    /* NULL pointers. */
    CHECK(needle_call(ws, q, qlen, out, sizeof out, NULL) == NEEDLE_ERR_ARGUMENT);
    CHECK(needle_call(ws, NULL, qlen, out, sizeof out, &len) == NEEDLE_ERR_ARGUMENT);
    CHECK(needle_call(ws, q, qlen, NULL, sizeof out, &len) == NEEDLE_ERR_ARGUMENT);
    /* Invalid UTF-8: a lone continuation byte, a truncated sequence, an encoded surrogate. */
    static const uint8_t bad1[] = {'h', 'i', 0x80};
    static const uint8_t bad2[] = {'h', 0xe2, 0x82};
    static const uint8_t bad3[] = {0xed, 0xa0, 0x80};
    CHECK(needle_call(ws, bad1, sizeof bad1, out, sizeof out, &len) == NEEDLE_ERR_UTF8);
    CHECK(needle_call(ws, bad2, sizeof bad2, out, sizeof out, &len) == NEEDLE_ERR_UTF8);
    CHECK(needle_call(ws, bad3, sizeof bad3, out, sizeof out, &len) == NEEDLE_ERR_UTF8);
    /* Too long. */
    uint8_t *huge = malloc(NEEDLE_MAX_QUERY_BYTES + 1);
    memset(huge, 'a', NEEDLE_MAX_QUERY_BYTES + 1);
    CHECK(needle_call(ws, huge, NEEDLE_MAX_QUERY_BYTES + 1, out, sizeof out, &len) == NEEDLE_ERR_QUERY_TOO_LONG);
    free(huge);

    /* The real answer, then the too-small-buffer contract: the exact size is reported and the
       same call with that size succeeds with the same bytes. */
    CHECK(needle_call(ws, q, qlen, out, sizeof out, &len) == NEEDLE_OK);
    size_t full = len;
    uint8_t first[NEEDLE_MAX_OUTPUT_BYTES];
    memcpy(first, out, full);
    CHECK(full > 0);
    size_t need = 0;
    uint8_t small[4];
    CHECK(needle_call(ws, q, qlen, small, full - 1 < sizeof small ? full - 1 : sizeof small, &need) ==
          NEEDLE_ERR_OUT_TOO_SMALL);
    CHECK(need == full);
    CHECK(needle_call(ws, q, qlen, NULL, 0, &need) == NEEDLE_ERR_OUT_TOO_SMALL);
    CHECK(need == full);
    uint8_t *exact = malloc(full);
    CHECK(needle_call(ws, q, qlen, exact, full, &len) == NEEDLE_OK && len == full);
    CHECK(memcmp(exact, first, full) == 0);
    free(exact);
    /* An empty query is a query. */
    CHECK(needle_call(ws, (const uint8_t *)"", 0, out, sizeof out, &len) == NEEDLE_OK);
    CHECK(needle_call(ws, NULL, 0, out, sizeof out, &len) == NEEDLE_OK);
    printf("ok call\n");

    /* Token level. */
    int32_t ids[3] = {5, 6, 7};
    int32_t gen[NEEDLE_MAX_GEN_LEN];
    size_t n_gen = 0;
    CHECK(needle_call_tokens(ws, ids, 3, gen, NEEDLE_MAX_GEN_LEN, &n_gen) == NEEDLE_OK);
    CHECK(n_gen < NEEDLE_MAX_GEN_LEN);
    int32_t bad_ids[2] = {7, NEEDLE_VOCAB_SIZE};
    CHECK(needle_call_tokens(ws, bad_ids, 2, gen, NEEDLE_MAX_GEN_LEN, &n_gen) == NEEDLE_ERR_TOKEN);
    int32_t neg_ids[1] = {-1};
    CHECK(needle_call_tokens(ws, neg_ids, 1, gen, NEEDLE_MAX_GEN_LEN, &n_gen) == NEEDLE_ERR_TOKEN);
    CHECK(needle_call_tokens(NULL, ids, 3, gen, NEEDLE_MAX_GEN_LEN, &n_gen) == NEEDLE_ERR_WORKSPACE);
    printf("ok tokens\n");

    /* Model facts. */
    needle_info info;
    memset(&info, 0xff, sizeof info);
    needle_model_info(&info);
    needle_model_info(NULL);
    CHECK(info.vocab_size == NEEDLE_VOCAB_SIZE);
    CHECK(info.fold_tools == NEEDLE_FOLD_TOOLS);
    CHECK(info.max_gen_len == NEEDLE_MAX_GEN_LEN);
    CHECK(info.max_output_bytes == NEEDLE_MAX_OUTPUT_BYTES);
    printf("info %u %u %u %u %u %u %u\n", info.abi_version, info.vocab_size, info.d_model, info.num_heads,
           info.num_kv_heads, info.num_encoder_layers, info.num_decoder_layers);
    for (uint32_t i = 0; i < info.n_tools; i++) printf("tool %s\n", needle_tool_name((int32_t)i));
    CHECK(needle_tool_name((int32_t)info.n_tools) == NULL);
    CHECK(needle_tool_name(-1) == NULL);
    CHECK(info.abi_version == 3);
    CHECK(info.escalate_below == NEEDLE_ESCALATE_BELOW);
    printf("escalate_below %.9g\n", (double)info.escalate_below);

    /* call_ex: a result is required; an error leaves it defined (no confidence, no tool, and
       escalate by the same rule); the answer is NAME_call's. */
    needle_result r;
    memset(&r, 0xff, sizeof r);
    CHECK(needle_call_ex(ws, q, qlen, out, sizeof out, &len, NULL) == NEEDLE_ERR_ARGUMENT);
    CHECK(needle_call_ex(NULL, q, qlen, out, sizeof out, &len, &r) == NEEDLE_ERR_WORKSPACE);
    CHECK(r.confidence == 0.0f && r.tool == -1 && r.parsed == 0 && r.choice_steps == 0);
    CHECK(r.escalate == (0.0f < NEEDLE_ESCALATE_BELOW));
    memset(&r, 0xff, sizeof r);
    CHECK(needle_call_ex(ws, bad1, sizeof bad1, out, sizeof out, &len, &r) == NEEDLE_ERR_UTF8);
    CHECK(r.confidence == 0.0f && r.tool == -1 && r.parsed == 0);
    memset(&r, 0xff, sizeof r);
    CHECK(needle_call_ex(ws, q, qlen, small, 1, &need, &r) == NEEDLE_ERR_OUT_TOO_SMALL);
    CHECK(need == full);
    CHECK(r.confidence > 0.0f && r.confidence <= 1.0f && r.choice_steps > 0);
    CHECK(r.escalate == (r.confidence < NEEDLE_ESCALATE_BELOW));
    CHECK(r.tool >= -1 && r.tool < (int32_t)info.n_tools);
    CHECK(r.parsed == 1); /* the weather call is JSON */
    needle_result r2;
    CHECK(needle_call_ex(ws, q, qlen, out, sizeof out, &len, &r2) == NEEDLE_OK && len == full);
    CHECK(memcmp(out, first, full) == 0);
    CHECK(memcmp(&r, &r2, sizeof r) == 0);
    printf("ok call_ex %s\n", r.tool >= 0 ? needle_tool_name(r.tool) : "-");
    free(ws);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "answer";
    if (strcmp(mode, "contracts") == 0) return contracts();
    size_t n = 0;
    query_t *qs = read_queries(&n);
    if (strcmp(mode, "answer") == 0) {
        job_t j = new_job(qs, n);
        run_job(&j);
        for (size_t i = 0; i < n; i++) print_result(j.statuses[i], j.outs[i], j.lens[i]);
        return 0;
    }
    if (strcmp(mode, "threads") == 0) {
        enum { T = 4 };
        pthread_t th[T];
        job_t jobs[T];
        for (int t = 0; t < T; t++) {
            jobs[t] = new_job(qs, n);
            pthread_create(&th[t], NULL, run_job, &jobs[t]);
        }
        for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
        for (int t = 1; t < T; t++)
            for (size_t i = 0; i < n; i++)
                CHECK(jobs[t].statuses[i] == jobs[0].statuses[i] && jobs[t].lens[i] == jobs[0].lens[i] &&
                      memcmp(jobs[t].outs[i], jobs[0].outs[i], jobs[0].lens[i]) == 0);
        for (size_t i = 0; i < n; i++) print_result(jobs[0].statuses[i], jobs[0].outs[i], jobs[0].lens[i]);
        return 0;
    }
    if (strcmp(mode, "steps") == 0) {
        uint8_t *ws = new_workspace();
        uint8_t *out = malloc(NEEDLE_MAX_OUTPUT_BYTES);
        for (size_t i = 0; i < n; i++) {
            size_t len = 0;
            int32_t st = needle_call(ws, qs[i].bytes, qs[i].len, out, NEEDLE_MAX_OUTPUT_BYTES, &len);
            uint32_t counts[5];
            memcpy(counts, ws + NEEDLE_WORKSPACE_SIZE - 64, sizeof counts);
            printf("%d %u %u %u %u %u\n", (int)st, counts[0], counts[1], counts[2], counts[3],
                   counts[4]);
        }
        free(out);
        free(ws);
        return 0;
    }
    if (strcmp(mode, "ex") == 0) {
        uint8_t *ws = new_workspace();
        uint8_t *out = malloc(NEEDLE_MAX_OUTPUT_BYTES);
        uint8_t *out_ex = malloc(NEEDLE_MAX_OUTPUT_BYTES);
        for (size_t i = 0; i < n; i++) {
            size_t len = 0, len_ex = 0;
            int32_t st = needle_call(ws, qs[i].bytes, qs[i].len, out, NEEDLE_MAX_OUTPUT_BYTES, &len);
            needle_result r;
            memset(&r, 0xff, sizeof r);
            int32_t st_ex =
                needle_call_ex(ws, qs[i].bytes, qs[i].len, out_ex, NEEDLE_MAX_OUTPUT_BYTES, &len_ex, &r);
            CHECK(st == st_ex && len == len_ex && memcmp(out, out_ex, len) == 0);
            printf("%d %.9g %d %d %d %u ", (int)st_ex, (double)r.confidence, (int)r.escalate, (int)r.tool,
                   (int)r.parsed, r.choice_steps);
            for (size_t k = 0; k < len_ex; k++) printf("%02x", out_ex[k]);
            printf("\n");
        }
        free(out);
        free(out_ex);
        free(ws);
        return 0;
    }
    fprintf(stderr, "usage: %s answer|contracts|threads|steps|ex\n", argv[0]);
    return 2;
}
