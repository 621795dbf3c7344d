/* The guest's C runtime: internal declarations shared by its files. It is freestanding C
 * (no glibc headers except where noted), linked into the guest with the Rust half
 * (guest/src/libc): memory, threads, time and the process live there; formatting, parsing
 * and anything with floating point live here, because the guest's Rust is soft-float. */
#ifndef CRT_H
#define CRT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* From the Rust half. */
long write(int fd, const void *buf, size_t len);
int *__errno_location(void);
void __cbench_exit(int status) __attribute__((noreturn));
void __cbench_abort(void) __attribute__((noreturn));
void *malloc(size_t n);
void free(void *p);
void *realloc(void *p, size_t n);

/* Formatting (fmt.c): writes through `out`, returns the number of characters produced. */
typedef void (*crt_sink)(void *ctx, const char *s, size_t n);
int crt_format(crt_sink out, void *ctx, const char *fmt, va_list ap);

/* Streams (stdio.c). */
void crt_flush_all(void);

size_t strlen(const char *s);
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);

#endif
