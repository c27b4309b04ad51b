/*
 * Drives the generated output functions (prefix out_) for tests/tests/codegen_output.rs.
 * Reads binary records from stdin (u32 values in host byte order), writes one line per record:
 *   'V' len bytes                    -> "<valid>"
 *   'D' n room ids[n]                -> "<bytes> <hex>"
 *   'P' len bytes cap scratch_bytes  -> "<status> <out_len> <hex of out[0..min(out_len,cap)]>"
 * Every buffer is followed by guard bytes that must survive the call.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include HEADER

#define GUARD 64

static void read_exact(void *p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "truncated input\n");
        exit(3);
    }
}

static uint32_t read_u32(void) {
    uint32_t v;
    read_exact(&v, 4);
    return v;
}

static uint8_t *guarded(size_t n) {
    uint8_t *p = malloc(n + GUARD);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(3);
    }
    memset(p, 0xCD, n);
    memset(p + n, 0xA5, GUARD);
    return p;
}

static void check_guard(const uint8_t *p, size_t n, const char *what) {
    for (size_t i = 0; i < GUARD; i++) {
        if (p[n + i] != 0xA5) {
            fprintf(stderr, "%s: write past the end (offset %zu)\n", what, n + i);
            exit(2);
        }
    }
}

static void hex(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        printf("%02x", p[i]);
    }
}

int main(void) {
    int c;
    while ((c = getchar()) != EOF) {
        if (c == 'V') {
            size_t len = read_u32();
            uint8_t *s = guarded(len);
            read_exact(s, len);
            printf("%d\n", (int)out_validate_utf8(s, len));
            free(s);
        } else if (c == 'D') {
            size_t n = read_u32();
            size_t room = read_u32();
            int32_t *ids = malloc(n * sizeof(int32_t) + 1);
            uint8_t *out = guarded(room);
            read_exact(ids, n * sizeof(int32_t));
            size_t m = out_detokenize(ids, n, out);
            check_guard(out, room, "detokenize");
            printf("%zu ", m);
            hex(out, m <= room ? m : room);
            printf("\n");
            free(ids);
            free(out);
        } else if (c == 'P') {
            size_t len = read_u32();
            uint8_t *text = guarded(len);
            read_exact(text, len);
            size_t cap = read_u32();
            size_t scratch_n = read_u32();
            uint8_t *out = guarded(cap);
            uint8_t *scratch = guarded(scratch_n);
            size_t out_len = 12345;
            int32_t tool[2] = {12345, 12345}; /* the tool, then whether the text parsed as JSON */
            int32_t st = out_postprocess(text, len, out, cap, &out_len, scratch, tool);
            check_guard(text, len, "postprocess text");
            check_guard(out, cap, "postprocess out");
            check_guard(scratch, scratch_n, "postprocess scratch");
            printf("%d %zu %d %d ", (int)st, out_len, (int)tool[0], (int)tool[1]);
            if (st == 0 || st == 1) {
                hex(out, out_len <= cap ? out_len : cap);
            }
            printf("\n");
            free(text);
            free(out);
            free(scratch);
        } else {
            fprintf(stderr, "unknown record %d\n", c);
            return 3;
        }
    }
    return 0;
}
