/*
 * The smallest app around a library built by `needlec build --name needle`: answers the query
 * given on the command line and prints the tool call.
 *
 *   cc -std=c11 examples/c/ask.c -Ibuild -Lbuild -lneedle -o build/ask
 *   build/ask "Turn off the lights in the kitchen"
 */
#define _POSIX_C_SOURCE 200112L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "needle.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s QUERY\n", argv[0]);
        return 2;
    }
    /* One workspace per thread; the library allocates nothing itself. */
    void *workspace = NULL;
    if (posix_memalign(&workspace, NEEDLE_WORKSPACE_ALIGN, NEEDLE_WORKSPACE_SIZE) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    static uint8_t out[NEEDLE_MAX_OUTPUT_BYTES];
    size_t out_len = 0;
    int32_t status = needle_call(workspace, (const uint8_t *)argv[1], strlen(argv[1]), out, sizeof out, &out_len);
    free(workspace);
    if (status != NEEDLE_OK) {
        fprintf(stderr, "needle_call failed with status %d\n", (int)status);
        return 1;
    }
    printf("%.*s\n", (int)out_len, (const char *)out);
    return 0;
}
