/* Blocks above the slab classes (whole-page regions), which the runtime keeps for reuse after
 * free: a reused block must never leak its old contents into calloc, realloc must keep what
 * it copies, and many blocks at once (more than the cache holds) must all stay distinct and
 * intact. Exits 0 only if every check passed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>

/* Opaque to the compiler, so that it cannot drop allocations, frees or stores. */
static void *volatile slot;

static int fail(const char *what, size_t size)
{
    printf("largeblocks: %s (size %zu)\n", what, size);
    return 1;
}

static int all(const unsigned char *p, size_t n, unsigned char v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return 0;
    return 1;
}

int main(void)
{
    static const size_t sizes[] = { 70000, 100000, 300000, 1 << 20, 5 << 20 };
    for (int round = 0; round < 3; round++) {
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            size_t n = sizes[k];
            unsigned char *p = malloc(n);
            if (!p || malloc_usable_size(p) < n)
                return fail("malloc", n);
            memset(p, 0xab, n);
            slot = p;
            free(slot);
            /* Most likely the same region again: calloc must hand it out zeroed. */
            unsigned char *z = calloc(1, n);
            if (!z || !all(z, n, 0))
                return fail("calloc of a reused block is not zero", n);
            memset(z, 0x5a, n);
            unsigned char *r = realloc(z, 2 * n);
            if (!r || !all(r, n, 0x5a))
                return fail("realloc to twice the size lost data", n);
            r = realloc(r, n / 3);
            if (!r || !all(r, n / 3, 0x5a))
                return fail("realloc to a third lost data", n);
            slot = r;
            free(slot);
        }
    }
    /* More than the cache holds (16 regions, 32 MiB): each block its own memory, intact. */
    enum { N = 48 };
    static unsigned char *blocks[N];
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++) {
            size_t n = sizes[i % 4];
            blocks[i] = round == 1 ? calloc(n, 1) : malloc(n);
            if (!blocks[i])
                return fail("malloc of many", n);
            if (round == 1 && !all(blocks[i], n, 0))
                return fail("calloc of many is not zero", n);
            memset(blocks[i], i + 1, n);
        }
        for (int i = 0; i < N; i++)
            if (!all(blocks[i], sizes[i % 4], (unsigned char)(i + 1)))
                return fail("a block was overwritten", sizes[i % 4]);
        for (int i = 0; i < N; i++) {
            slot = blocks[i];
            free(slot);
        }
    }
    printf("largeblocks: ok\n");
    return 0;
}
