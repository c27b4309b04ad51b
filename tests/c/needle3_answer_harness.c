/* Drives the generated Needle 3 answer code (exported as ans_answer).
 *
 * stdin, one text a line: "<cap> <scratch bytes> <hex of the text, or ->"
 * stdout, one line each: "status out_len out_hex tool parsed reasoning_start reasoning_len
 * reasoning_present" (out_hex "-" when empty or when the status is not 0).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include HEADER

static char line[1 << 20];
static uint8_t text[1 << 19];

int main(void) {
    while (fgets(line, sizeof line, stdin)) {
        char *p = line;
        size_t cap = (size_t)strtoul(p, &p, 10);
        size_t scratch_bytes = (size_t)strtoul(p, &p, 10);
        while (*p == ' ') p++;
        size_t n = 0;
        while (p[0] && p[1] && p[0] != '\n' && p[0] != '-') {
            unsigned v;
            if (sscanf(p, "%2x", &v) != 1) return 2;
            text[n++] = (uint8_t)v;
            p += 2;
        }
        uint8_t *out = malloc(cap + 1);
        uint8_t *scratch = aligned_alloc(16, (scratch_bytes + 16) / 16 * 16);
        if (!out || !scratch) return 3;
        size_t out_len = 0;
        int32_t tool[2] = {7, 7};
        size_t reasoning[3] = {9, 9, 9};
        int32_t st = ans_answer(text, n, out, cap, &out_len, scratch, tool, reasoning);
        printf("%d %zu ", (int)st, out_len);
        if (st != 0 || out_len == 0) {
            printf("-");
        } else {
            for (size_t i = 0; i < out_len; i++) printf("%02x", out[i]);
        }
        printf(" %d %d %zu %zu %zu\n", (int)tool[0], (int)tool[1], reasoning[0], reasoning[1],
               reasoning[2]);
        free(out);
        free(scratch);
    }
    return 0;
}
