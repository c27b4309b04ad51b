/*
 * Test harness for needlec's generated query tokenizer (tests/tests/codegen_tokenizer.rs).
 *
 * Input on stdin, repeated: a line "MAX_IDS LEN\n", then exactly LEN bytes of text.
 * Output: one line per text, "COUNT ID ID ...".
 *
 * The header (HEADER) must define TK_SCRATCH_BYTES and TK_MAX_TEXT_BYTES and declare
 * tk_tokenize. To catch out-of-bounds accesses without a sanitizer, the text, the ids and the
 * scratch each end exactly at an inaccessible page (a read or write past the end faults: ids[MAX_IDS]
 * is already on it), and the scratch starts as garbage and keeps whatever the previous call left
 * in it (the code must not rely on zeroed memory).
 */
#define _DEFAULT_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include HEADER

static size_t page_size(void) {
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
}

/* A block of `size` bytes that ends where a PROT_NONE page begins. `*base`, `*total`: what to
 * unmap. */
static unsigned char *guarded(size_t size, void **base, size_t *total) {
    size_t page = page_size();
    size_t body = (size + page - 1) / page * page;
    if (body == 0) {
        body = page;
    }
    *total = body + page;
    unsigned char *m = mmap(NULL, *total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    if (m == MAP_FAILED) {
        perror("harness: mmap");
        exit(2);
    }
    if (mprotect(m + body, page, PROT_NONE) != 0) {
        perror("harness: mprotect");
        exit(2);
    }
    *base = m;
    return m + body - size;
}

int main(void) {
    void *scratch_base;
    size_t scratch_total;
    unsigned char *scratch = guarded(TK_SCRATCH_BYTES, &scratch_base, &scratch_total);
    if (((uintptr_t)scratch & 15) != 0) {
        fprintf(stderr, "harness: scratch not 16-byte aligned\n");
        return 2;
    }
    /* Garbage, not zeros: the tokenizer must initialize what it reads. */
    memset(scratch, 0xA5, TK_SCRATCH_BYTES);

    size_t max_ids, len;
    while (scanf("%zu %zu", &max_ids, &len) == 2) {
        if (getchar() != '\n') {
            fprintf(stderr, "harness: expected a newline after the record header\n");
            return 2;
        }
        if (len > TK_MAX_TEXT_BYTES) {
            fprintf(stderr, "harness: text of %zu bytes is over the limit\n", len);
            return 2;
        }
        void *text_base, *ids_base;
        size_t text_total, ids_total;
        unsigned char *text = guarded(len, &text_base, &text_total);
        if (fread(text, 1, len, stdin) != len) {
            fprintf(stderr, "harness: short text\n");
            return 2;
        }
        int32_t *ids = (int32_t *)(void *)guarded(max_ids * sizeof(int32_t), &ids_base, &ids_total);
        size_t n = tk_tokenize(text, len, ids, max_ids, scratch);
        if (n > max_ids) {
            fprintf(stderr, "harness: returned %zu ids for max_ids %zu\n", n, max_ids);
            return 1;
        }
        printf("%zu", n);
        for (size_t i = 0; i < n; i++) {
            printf(" %" PRId32, ids[i]);
        }
        printf("\n");
        munmap(text_base, text_total);
        munmap(ids_base, ids_total);
    }
    if (!feof(stdin)) {
        fprintf(stderr, "harness: malformed input\n");
        return 2;
    }
    munmap(scratch_base, scratch_total);
    return 0;
}
