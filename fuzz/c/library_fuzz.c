/*
 * libFuzzer harness for the library `needlec build --name needle` emits (scripts/fuzz builds it
 * for the bundled model and links it with `clang -fsanitize=fuzzer`).
 *
 * Input: byte 0 picks the entry point (bits 0-1) and where buffers sit (bit 2), byte 1 the
 * output capacity; the rest is the query's
 * bytes (needle_call, needle_call_ex) or little-endian int32 token ids (needle_call_tokens),
 * any values, negative and past the vocabulary included.
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
    size_t ws = needle_workspace_size();
    CHECK(ws == NEEDLE_WORKSPACE_SIZE);
    workspace_map = guarded(ws + NEEDLE_WORKSPACE_ALIGN);
    uintptr_t start = (uintptr_t)(workspace_map.end - ws);
    start &= ~(uintptr_t)(NEEDLE_WORKSPACE_ALIGN - 1);
    workspace_end = (void *)start;
    workspace_start = workspace_map.end - workspace_map.cap; /* page-aligned */
    /* Queries past the byte limit are refused before being read; 4 ids a query byte. */
    query_map = guarded(4 * (NEEDLE_MAX_QUERY_BYTES + 64));
    out_map = guarded(NEEDLE_MAX_OUTPUT_BYTES * 4 > NEEDLE_MAX_GEN_LEN * 4 ? NEEDLE_MAX_OUTPUT_BYTES * 4
                                                                            : NEEDLE_MAX_GEN_LEN * 4);
    return 0;
}

static void fuzz_text(const uint8_t *data, size_t size, uint8_t mode, uint8_t pick) {
    if (size > query_map.cap) size = query_map.cap;
    uint8_t *query = flush_end(&query_map, size);
    if (size) memcpy(query, data, size);
    size_t cap = out_capacity(pick, NEEDLE_MAX_OUTPUT_BYTES);
    uint8_t *out = flush_end(&out_map, cap);
    size_t out_len = (size_t)-1;
    int32_t status;
    needle_result result;
    memset(&result, 0xA5, sizeof result);
    if (mode & 2) {
        status = needle_call_ex(workspace, query, size, out, cap, &out_len, &result);
    } else {
        status = needle_call(workspace, query, size, out, cap, &out_len);
    }
    CHECK(status == NEEDLE_OK || status == NEEDLE_ERR_UTF8 || status == NEEDLE_ERR_QUERY_TOO_LONG ||
          status == NEEDLE_ERR_OUT_TOO_SMALL || status == NEEDLE_ERR_OUTPUT || status == NEEDLE_ERR_NUMERIC);
    if (size > NEEDLE_MAX_QUERY_BYTES) CHECK(status == NEEDLE_ERR_QUERY_TOO_LONG);
    observe((uint64_t)status << 8 | (mode & 2), out_len);
    if (status == NEEDLE_OK) {
        CHECK(out_len <= cap);
        CHECK(out_len <= NEEDLE_MAX_OUTPUT_BYTES);
        observe(0x100 + (out_len > 0 ? out[0] : 0), out_len > 1 ? out[out_len / 2] : 0);
        if (mode & 2) {
            CHECK(result.confidence >= 0.0f && result.confidence <= 1.0f);
            CHECK(result.parsed == 0 || result.parsed == 1);
            CHECK(result.escalate == 0 || result.escalate == 1);
            CHECK(result.tool >= -1);
            CHECK(result.choice_steps < NEEDLE_MAX_GEN_LEN);
            observe(0x200 + (uint64_t)(result.tool + 1), (uint64_t)result.choice_steps << 1 | (uint64_t)result.parsed);
        }
    } else if (status == NEEDLE_ERR_OUT_TOO_SMALL) {
        CHECK(out_len > cap);
        CHECK(out_len <= NEEDLE_MAX_OUTPUT_BYTES);
        /* The size it asked for must be enough: the second call answers in full. */
        uint8_t *again = flush_end(&out_map, out_len);
        size_t again_len = (size_t)-1;
        CHECK(needle_call(workspace, query, size, again, out_len, &again_len) == NEEDLE_OK);
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
        ids[i] = (data[4 * i + 3] & 0x80) ? (int32_t)v : (int32_t)(v % (NEEDLE_VOCAB_SIZE + 2));
    }
    size_t cap = out_capacity(pick, NEEDLE_MAX_GEN_LEN);
    int32_t *out = (int32_t *)flush_end(&out_map, cap * 4);
    size_t out_len = (size_t)-1;
    int32_t status = needle_call_tokens(workspace, ids, n, out, cap, &out_len);
    CHECK(status == NEEDLE_OK || status == NEEDLE_ERR_TOKEN || status == NEEDLE_ERR_QUERY_TOO_LONG ||
          status == NEEDLE_ERR_OUT_TOO_SMALL || status == NEEDLE_ERR_NUMERIC);
    observe(0x300 + (uint64_t)status, out_len);
    /* The ids are cut to MAX_QUERY_TOKENS (folded builds) before they are checked; an id past
     * the cut is never read. */
    size_t kept = n < NEEDLE_MAX_QUERY_TOKENS ? n : NEEDLE_MAX_QUERY_TOKENS;
    int bad_id = 0;
    for (size_t i = 0; i < kept; i++) bad_id |= ids[i] < 0 || ids[i] >= NEEDLE_VOCAB_SIZE;
    if (status == NEEDLE_OK) {
        CHECK(!bad_id);
        CHECK(out_len <= cap);
        CHECK(out_len < NEEDLE_MAX_GEN_LEN);
        for (size_t i = 0; i < out_len; i++) CHECK(out[i] >= 0 && out[i] < NEEDLE_VOCAB_SIZE);
        if (out_len > 0) observe(0x400 + (uint64_t)out[0], out_len > 2 ? (uint64_t)out[1] << 16 | (uint64_t)out[2] : 0);
    } else if (status == NEEDLE_ERR_OUT_TOO_SMALL) {
        CHECK(out_len > cap);
        CHECK(out_len < NEEDLE_MAX_GEN_LEN);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    uint8_t mode = data[0], pick = data[1];
    at_start = (mode & 4) != 0;
    workspace = at_start ? workspace_start : workspace_end;
    if (mode & 1) {
        fuzz_tokens(data + 2, size - 2, pick);
    } else {
        fuzz_text(data + 2, size - 2, mode, pick);
    }
    return 0;
}
