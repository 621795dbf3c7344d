// C++ support for the guest: operator new and delete (plain, array, sized, aligned, nothrow)
// on malloc, the guards of function-local statics, and the streams of the guest's <iostream>.
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <new>
#include <iostream>

namespace {
// Exceptions are off: a failed allocation ends the program, as an uncaught bad_alloc would.
void *checked(void *p, size_t n)
{
    if (!p) {
        fprintf(stderr, "terminate called after throwing an instance of 'std::bad_alloc' (%zu bytes)\n", n);
        abort();
    }
    return p;
}
} // namespace

void *operator new(size_t n) { return checked(malloc(n), n); }
void *operator new[](size_t n) { return checked(malloc(n), n); }
void *operator new(size_t n, const std::nothrow_t &) noexcept { return malloc(n); }
void *operator new[](size_t n, const std::nothrow_t &) noexcept { return malloc(n); }
void *operator new(size_t n, std::align_val_t a) { return checked(aligned_alloc(size_t(a), n), n); }
void *operator new[](size_t n, std::align_val_t a) { return checked(aligned_alloc(size_t(a), n), n); }
void operator delete(void *p) noexcept { free(p); }
void operator delete[](void *p) noexcept { free(p); }
void operator delete(void *p, size_t) noexcept { free(p); }
void operator delete[](void *p, size_t) noexcept { free(p); }
void operator delete(void *p, std::align_val_t) noexcept { free(p); }
void operator delete[](void *p, std::align_val_t) noexcept { free(p); }
void operator delete(void *p, size_t, std::align_val_t) noexcept { free(p); }
void operator delete[](void *p, size_t, std::align_val_t) noexcept { free(p); }
void operator delete(void *p, const std::nothrow_t &) noexcept { free(p); }
void operator delete[](void *p, const std::nothrow_t &) noexcept { free(p); }

extern "C" {
// Function-local statics: byte 0 of the guard is "done", byte 1 "in progress".
int __cxa_guard_acquire(long long *g)
{
    char *b = reinterpret_cast<char *>(g);
    for (;;) {
        if (__atomic_load_n(&b[0], __ATOMIC_ACQUIRE))
            return 0;
        char expected = 0;
        if (__atomic_compare_exchange_n(&b[1], &expected, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
        __builtin_ia32_pause();
    }
}

void __cxa_guard_release(long long *g)
{
    char *b = reinterpret_cast<char *>(g);
    __atomic_store_n(&b[0], 1, __ATOMIC_RELEASE);
}

void __cxa_guard_abort(long long *g)
{
    char *b = reinterpret_cast<char *>(g);
    __atomic_store_n(&b[1], 0, __ATOMIC_RELEASE);
}

void __cxa_pure_virtual() { abort(); }
}

namespace std {
ostream cout(1);
ostream cerr(2);
ostream clog(2);
} // namespace std
