/* Streams: stdout and stderr go to the guest console (stdout line-buffered, stderr
 * unbuffered); there are no files, so fopen fails with ENOENT and reading gives EOF.
 *
 * Deliberately does not include <stdio.h>: FILE is ours. Its first fields mirror glibc's
 * struct _IO_FILE (flags, then the read and write pointers), all null, so glibc's inline
 * getc/putc fall through to __uflow/__overflow here. */
#include "crt.h"

#define BUF 1024
#define EOF (-1)

struct _IO_FILE {
    int flags;
    char *read_ptr, *read_end, *read_base, *write_base, *write_ptr, *write_end;
    /* Ours. */
    int fd;
    int unbuffered;
    int err;
    size_t len;
    char buf[BUF];
};
typedef struct _IO_FILE FILE;

static FILE out_file = {.fd = 1};
static FILE err_file = {.fd = 2, .unbuffered = 1};
static FILE in_file = {.fd = 0};
FILE *stdout = &out_file;
FILE *stderr = &err_file;
FILE *stdin = &in_file;

/* Streams are shared by threads; a spinlock keeps each call's output together. */
static volatile int stream_lock;

static void lock(void)
{
    while (__atomic_exchange_n(&stream_lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&stream_lock, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static void unlock(void)
{
    __atomic_store_n(&stream_lock, 0, __ATOMIC_RELEASE);
}

static void flush_locked(FILE *f)
{
    if (f->len) {
        write(f->fd, f->buf, f->len);
        f->len = 0;
    }
}

static void put_locked(FILE *f, const char *s, size_t n)
{
    if (f->fd == 0) {
        f->err = 1;
        return;
    }
    if (f->unbuffered) {
        write(f->fd, s, n);
        return;
    }
    int nl = 0;
    for (size_t i = 0; i < n; i++) {
        if (f->len == BUF)
            flush_locked(f);
        f->buf[f->len++] = s[i];
        nl |= s[i] == '\n';
    }
    if (nl)
        flush_locked(f);
}

static void sink(void *ctx, const char *s, size_t n)
{
    put_locked((FILE *)ctx, s, n);
}

void crt_flush_all(void)
{
    lock();
    flush_locked(stdout);
    flush_locked(stderr);
    unlock();
}

int vfprintf(FILE *f, const char *fmt, va_list ap)
{
    lock();
    int n = crt_format(sink, f, fmt, ap);
    unlock();
    return n;
}

int fprintf(FILE *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vfprintf(f, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    return vfprintf(stdout, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vfprintf(stdout, fmt, ap);
    va_end(ap);
    return n;
}

struct strbuf {
    char *s;
    size_t cap, len;
};

static void str_sink(void *ctx, const char *s, size_t n)
{
    struct strbuf *b = ctx;
    for (size_t i = 0; i < n; i++) {
        if (b->len + 1 < b->cap)
            b->s[b->len] = s[i];
        b->len++;
    }
}

int vsnprintf(char *s, size_t cap, const char *fmt, va_list ap)
{
    struct strbuf b = {s, cap, 0};
    int n = crt_format(str_sink, &b, fmt, ap);
    if (cap)
        s[b.len < cap ? b.len : cap - 1] = 0;
    return n;
}

int snprintf(char *s, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s, cap, fmt, ap);
    va_end(ap);
    return n;
}

int vsprintf(char *s, const char *fmt, va_list ap)
{
    return vsnprintf(s, (size_t)-1 >> 1, fmt, ap);
}

int sprintf(char *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsprintf(s, fmt, ap);
    va_end(ap);
    return n;
}

int fputs(const char *s, FILE *f)
{
    lock();
    put_locked(f, s, strlen(s));
    unlock();
    return f->err ? EOF : 0;
}

int puts(const char *s)
{
    lock();
    put_locked(stdout, s, strlen(s));
    put_locked(stdout, "\n", 1);
    unlock();
    return 0;
}

int fputc(int c, FILE *f)
{
    char ch = (char)c;
    lock();
    put_locked(f, &ch, 1);
    unlock();
    return f->err ? EOF : (unsigned char)c;
}

int putc(int c, FILE *f)
{
    return fputc(c, f);
}

int putchar(int c)
{
    return fputc(c, stdout);
}

int putchar_unlocked(int c)
{
    return fputc(c, stdout);
}

int fputc_unlocked(int c, FILE *f)
{
    return fputc(c, f);
}

int __overflow(FILE *f, int c)
{
    return c == EOF ? 0 : fputc(c, f);
}

int __uflow(FILE *f)
{
    (void)f;
    return EOF;
}

size_t fwrite(const void *p, size_t size, size_t n, FILE *f)
{
    lock();
    put_locked(f, p, size * n);
    unlock();
    return f->err ? 0 : n;
}

int fflush(FILE *f)
{
    lock();
    if (f) {
        flush_locked(f);
    } else {
        flush_locked(stdout);
        flush_locked(stderr);
    }
    unlock();
    return 0;
}

int setvbuf(FILE *f, char *buf, int mode, size_t size)
{
    (void)buf;
    (void)size;
    fflush(f);
    f->unbuffered = mode == 2; /* _IONBF */
    return 0;
}

void setbuf(FILE *f, char *buf)
{
    setvbuf(f, buf, buf ? 0 : 2, BUF);
}

FILE *fopen(const char *path, const char *mode)
{
    (void)path;
    (void)mode;
    *__errno_location() = 2; /* ENOENT: there is no file system */
    return 0;
}

FILE *fdopen(int fd, const char *mode)
{
    (void)mode;
    return fd == 1 ? stdout : fd == 2 ? stderr : fd == 0 ? stdin : 0;
}

int fclose(FILE *f)
{
    fflush(f);
    return 0;
}

int fileno(FILE *f)
{
    return f->fd;
}

int ferror(FILE *f)
{
    return f->err;
}

int feof(FILE *f)
{
    return f->fd == 0;
}

void clearerr(FILE *f)
{
    f->err = 0;
}

int fgetc(FILE *f)
{
    (void)f;
    return EOF;
}

int getc(FILE *f)
{
    return fgetc(f);
}

int getchar(void)
{
    return EOF;
}

char *fgets(char *s, int n, FILE *f)
{
    (void)s;
    (void)n;
    (void)f;
    return 0;
}

int __isoc99_scanf(const char *fmt, ...)
{
    (void)fmt;
    return EOF;
}

int __isoc99_fscanf(FILE *f, const char *fmt, ...)
{
    (void)f;
    (void)fmt;
    return EOF;
}

int scanf(const char *fmt, ...) __attribute__((alias("__isoc99_scanf")));
int fscanf(FILE *f, const char *fmt, ...) __attribute__((alias("__isoc99_fscanf")));

const char *strerror(int e);

void perror(const char *s)
{
    int e = *__errno_location();
    if (s && *s)
        fprintf(stderr, "%s: %s\n", s, strerror(e));
    else
        fprintf(stderr, "%s\n", strerror(e));
}
