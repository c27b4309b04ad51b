/*
 * libFuzzer harness for a Needle 3 library, `needlec build --name n3 ...` of a Needle 3
 * checkpoint (scripts/fuzz builds it for the small golden checkpoint and links it with
 * `clang -fsanitize=fuzzer`); library_fuzz.c's guard pages and checks, for n3_call,
 * n3_call_ex (and n3_reasoning after it), n3_call_tokens and n3_embed.
 *
 * Input: byte 0 picks the entry point (bits 0-1: text call, token call, text call_ex, embed)
 * and where buffers sit (bit 2), byte 1 the output capacity; the rest is the query's bytes or
 * little-endian int32 token ids, any values, negative and past the vocabulary included.
 *
 * Every buffer the library is handed (workspace, query or ids, output) lies in its own mapping
 * with a PROT_NONE guard page before and after it, flush against the end guard (bit 2 of byte 0
 * clear) or against the start guard (set): a read or write one byte past the end, or one byte
 * before the start, faults at once, without a sanitizer in the library. A status outside
 * the header's list, a length past the capacity, a token id outside the vocabulary or calls
 * that disagree abort (a crash libFuzzer records).
 */
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include HEADER

#include "guarded.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    /* The workspace's end is page-aligned, so it starts 64-byte aligned exactly when its size is
     * a multiple of 64; otherwise it starts at the last aligned address that fits (the slack
     * after it is still inside the mapping, the one place an overrun would go unseen). */
    size_t ws = n3_workspace_size();
    CHECK(ws == N3_WORKSPACE_SIZE);
    workspace_map = guarded(ws + N3_WORKSPACE_ALIGN);
    uintptr_t start = (uintptr_t)(workspace_map.end - ws);
    start &= ~(uintptr_t)(N3_WORKSPACE_ALIGN - 1);
    workspace_end = (void *)start;
    workspace_start = workspace_map.end - workspace_map.cap; /* page-aligned */
    /* Queries past the byte limit are refused before being read; 4 ids a query byte. */
    query_map = guarded(4 * (N3_MAX_QUERY_BYTES + 64));
    out_map = guarded(N3_MAX_OUTPUT_BYTES * 4 > N3_MAX_GEN_LEN * 4 ? N3_MAX_OUTPUT_BYTES * 4
                                                                            : N3_MAX_GEN_LEN * 4);
    return 0;
}

static void fuzz_text(const uint8_t *data, size_t size, uint8_t mode, uint8_t pick) {
    if (size > query_map.cap) size = query_map.cap;
    uint8_t *query = flush_end(&query_map, size);
    if (size) memcpy(query, data, size);
    size_t cap = out_capacity(pick, N3_MAX_OUTPUT_BYTES);
    uint8_t *out = flush_end(&out_map, cap);
    size_t out_len = (size_t)-1;
    int32_t status;
    n3_result result;
    memset(&result, 0xA5, sizeof result);
    if (mode & 2) {
        status = n3_call_ex(workspace, query, size, out, cap, &out_len, &result);
    } else {
        status = n3_call(workspace, query, size, out, cap, &out_len);
    }
    CHECK(status == N3_OK || status == N3_ERR_UTF8 || status == N3_ERR_QUERY_TOO_LONG ||
          status == N3_ERR_OUT_TOO_SMALL || status == N3_ERR_OUTPUT || status == N3_ERR_NUMERIC);
    if (size > N3_MAX_QUERY_BYTES) CHECK(status == N3_ERR_QUERY_TOO_LONG);
    observe((uint64_t)status << 8 | (mode & 2), out_len);
    if (status == N3_OK) {
        CHECK(out_len <= cap);
        CHECK(out_len <= N3_MAX_OUTPUT_BYTES);
        observe(0x100 + (out_len > 0 ? out[0] : 0), out_len > 1 ? out[out_len / 2] : 0);
        if (mode & 2) {
            CHECK(result.confidence >= 0.0f && result.confidence <= 1.0f);
            CHECK(result.parsed == 0 || result.parsed == 1);
            CHECK(result.escalate == 0 || result.escalate == 1);
            CHECK(result.tool >= -1);
            CHECK(result.generated_tokens < N3_MAX_GEN_LEN);
            size_t rlen = (size_t)-1;
            const uint8_t *r = n3_reasoning(workspace, &rlen);
            CHECK(rlen == result.reasoning_len);
            CHECK(r != NULL || rlen == 0);
            for (size_t i = 0; r && i < rlen; i++) observe(0x500 + r[i], i);
            observe(0x200 + (uint64_t)(result.tool + 1), (uint64_t)result.generated_tokens << 1 | (uint64_t)result.parsed);
        }
    } else if (status == N3_ERR_OUT_TOO_SMALL) {
        CHECK(out_len > cap);
        CHECK(out_len <= N3_MAX_OUTPUT_BYTES);
        /* The size it asked for must be enough: the second call answers in full. */
        uint8_t *again = flush_end(&out_map, out_len);
        size_t again_len = (size_t)-1;
        CHECK(n3_call(workspace, query, size, again, out_len, &again_len) == N3_OK);
        CHECK(again_len == out_len);
    }
}

static void fuzz_tokens(const uint8_t *data, size_t size, uint8_t pick) {
    size_t n = size / 4;
    if (n * 4 > query_map.cap) n = query_map.cap / 4;
    int32_t *ids = (int32_t *)flush_end(&query_map, n * 4);
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)data[4 * i] | (uint32_t)data[4 * i + 1] << 8 | (uint32_t)data[4 * i + 2] << 16 |
                     (uint32_t)data[4 * i + 3] << 24;
        /* Mostly ids the vocabulary has (where the model does something), some that it has not. */
        ids[i] = (data[4 * i + 3] & 0x80) ? (int32_t)v : (int32_t)(v % (N3_VOCAB_SIZE + 2));
    }
    size_t cap = out_capacity(pick, N3_MAX_GEN_LEN);
    int32_t *out = (int32_t *)flush_end(&out_map, cap * 4);
    size_t out_len = (size_t)-1;
    int32_t status = n3_call_tokens(workspace, ids, n, out, cap, &out_len);
    CHECK(status == N3_OK || status == N3_ERR_TOKEN || status == N3_ERR_QUERY_TOO_LONG ||
          status == N3_ERR_OUT_TOO_SMALL || status == N3_ERR_NUMERIC || status == N3_ERR_ARGUMENT);
    observe(0x300 + (uint64_t)status, out_len);
    /* No ids, or more than MAX_QUERY_TOKENS, are refused before any is read. */
    if (n == 0) CHECK(status == N3_ERR_ARGUMENT);
    if (n > N3_MAX_QUERY_TOKENS) CHECK(status == N3_ERR_QUERY_TOO_LONG);
    int bad_id = 0;
    for (size_t i = 0; i < n; i++) bad_id |= ids[i] < 0 || ids[i] >= N3_VOCAB_SIZE;
    if (status == N3_OK) {
        CHECK(!bad_id);
        CHECK(out_len <= cap);
        CHECK(out_len < N3_MAX_GEN_LEN);
        for (size_t i = 0; i < out_len; i++) CHECK(out[i] >= 0 && out[i] < N3_VOCAB_SIZE);
        if (out_len > 0) observe(0x400 + (uint64_t)out[0], out_len > 2 ? (uint64_t)out[1] << 16 | (uint64_t)out[2] : 0);
    } else if (status == N3_ERR_OUT_TOO_SMALL) {
        CHECK(out_len > cap);
        CHECK(out_len < N3_MAX_GEN_LEN);
    }
}

/* n3_embed: the embedding (unit length) or a status, the output exactly EMBEDDING_DIM floats. */
static void fuzz_embed(const uint8_t *data, size_t size) {
    if (size > query_map.cap) size = query_map.cap;
    uint8_t *text = flush_end(&query_map, size);
    if (size) memcpy(text, data, size);
    float *out = (float *)flush_end(&out_map, N3_EMBEDDING_DIM * sizeof(float));
    int32_t status = n3_embed(workspace, text, size, out);
    CHECK(status == N3_OK || status == N3_ERR_UTF8 || status == N3_ERR_QUERY_TOO_LONG ||
          status == N3_ERR_NO_HEAD);
    observe(0x600 + (uint64_t)status, size);
    if (status == N3_OK) {
        double sum = 0;
        for (size_t i = 0; i < N3_EMBEDDING_DIM; i++) sum += (double)out[i] * out[i];
        CHECK(sum > 0.99 && sum < 1.01);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    uint8_t mode = data[0], pick = data[1];
    at_start = (mode & 4) != 0;
    workspace = at_start ? workspace_start : workspace_end;
    switch (mode & 3) {
        case 1: fuzz_tokens(data + 2, size - 2, pick); break;
        case 3: fuzz_embed(data + 2, size - 2); break;
        default: fuzz_text(data + 2, size - 2, mode, pick); break;
    }
    return 0;
}
