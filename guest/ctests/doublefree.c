/* Frees one object twice. The allocator must notice (the VMM checks every free) and end the
 * program with an error instead of handing the object out twice. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Opaque to the compiler, so that it cannot drop the allocations or the frees. */
static void *volatile slot;

int main(void)
{
    char *p = malloc(48);
    strcpy(p, "freed twice");
    slot = p;
    free(slot);
    free(slot);
    /* Until the program ends, no object may be handed out twice. */
    enum { N = 4096 };
    static uintptr_t seen[N];
    for (int i = 0; i < N; i++) {
        slot = malloc(48);
        seen[i] = (uintptr_t)slot;
        for (int j = 0; j < i; j++)
            if (seen[j] == seen[i]) {
                printf("doublefree: object %#lx handed out twice\n", (unsigned long)seen[i]);
                return 2;
            }
    }
    printf("doublefree: %d objects, all distinct\n", N);
    return 0;
}
