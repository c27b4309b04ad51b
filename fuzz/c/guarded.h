/*
 * What the library fuzz harnesses (library_fuzz.c for v1, needle3_library_fuzz.c for Needle 3)
 * share: the contract check, buffers between PROT_NONE guard pages, and libFuzzer feedback from
 * what the library answered. Included once per harness (everything is static).
 */
#ifndef NEEDLEC_FUZZ_GUARDED_H
#define NEEDLEC_FUZZ_GUARDED_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "contract failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                             \
        }                                                                        \
    } while (0)

typedef struct {
    uint8_t *end; /* one past the last usable byte: the first byte of the end guard */
    size_t cap;   /* usable bytes before end */
} guarded_t;

static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

/* A mapping of `cap` usable bytes (rounded up to pages) between two PROT_NONE pages. */
static guarded_t guarded(size_t cap) {
    size_t page = page_size();
    size_t body = (cap + page - 1) / page * page;
    if (body == 0) body = page;
    uint8_t *base = mmap(NULL, body + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(base != MAP_FAILED);
    CHECK(mprotect(base, page, PROT_NONE) == 0);
    CHECK(mprotect(base + page + body, page, PROT_NONE) == 0);
    guarded_t g = {base + page + body, body};
    return g;
}

/* Whether this input's buffers sit against the start guard instead of the end guard. */
static int at_start;

/* `n` bytes ending exactly at the end guard, or (at_start) starting exactly at the start guard. */
static uint8_t *flush_end(const guarded_t *g, size_t n) {
    CHECK(n <= g->cap);
    return at_start ? g->end - g->cap : g->end - n;
}

static guarded_t workspace_map, query_map, out_map;

/* The emitted code carries no coverage instrumentation, so the harness gives libFuzzer feedback
 * from what the library answered: libFuzzer counts these extra counters as coverage, so an input
 * that reaches a new (status, tool, output length, generated length, first ids) combination is
 * kept in the corpus like one that reached a new branch. */
#define FEEDBACK 4096
__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t feedback[FEEDBACK];

static void observe(uint64_t a, uint64_t b) {
    uint64_t h = (a * 0x9E3779B97F4A7C15ull) ^ (b + 0x632BE59BD9B4E019ull + (a << 6) + (a >> 2));
    h ^= h >> 29;
    feedback[h % FEEDBACK] = 1;
}
static void *workspace, *workspace_end, *workspace_start;

/* Output capacities worth trying: zero, tiny, around typical answers, the documented maximum. */
static size_t out_capacity(uint8_t pick, size_t max) {
    switch (pick & 7) {
        case 0: return 0;
        case 1: return 1;
        case 2: return (size_t)(pick >> 3); /* 0..31 */
        case 3: return (size_t)pick * 4;     /* up to 1020 */
        default: return max;
    }
}

#endif
