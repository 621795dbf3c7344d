/* Numbers from text (strtol family, strtod), glibc's rand, sorting, the environment, and the
 * program's start and end (constructors, atexit, exit, abort). */
#include "crt.h"

#define EINVAL 22
#define ERANGE 34

static int isspace_(int c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static int digit_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'Z')
        return c - 'A' + 10;
    return 99;
}

/* Parses an unsigned magnitude; sets *neg, *overflow; returns the value. */
static unsigned long long parse_ull(const char *s, char **end, int base, int *neg, int *overflow)
{
    const char *p = s;
    *neg = 0;
    *overflow = 0;
    while (isspace_(*p))
        p++;
    if (*p == '+' || *p == '-')
        *neg = *p++ == '-';
    if ((base == 0 || base == 16) && p[0] == '0' && (p[1] == 'x' || p[1] == 'X') && digit_value(p[2]) < 16) {
        p += 2;
        base = 16;
    } else if (base == 0) {
        base = p[0] == '0' ? 8 : 10;
    }
    if (base < 2 || base > 36) {
        *__errno_location() = EINVAL;
        if (end)
            *end = (char *)s;
        return 0;
    }
    const char *digits = p;
    unsigned long long v = 0;
    int d;
    while ((d = digit_value(*p)) < base) {
        if (v > (~0ULL - (unsigned)d) / (unsigned)base)
            *overflow = 1;
        v = v * (unsigned)base + (unsigned)d;
        p++;
    }
    if (end)
        *end = (char *)(p == digits ? s : p);
    return v;
}

long long strtoll(const char *s, char **end, int base)
{
    int neg, of;
    unsigned long long v = parse_ull(s, end, base, &neg, &of);
    if (of || v > (neg ? 0x8000000000000000ULL : 0x7fffffffffffffffULL)) {
        *__errno_location() = ERANGE;
        return neg ? (long long)0x8000000000000000ULL : 0x7fffffffffffffffLL;
    }
    return neg ? (long long)(0ULL - v) : (long long)v;
}

unsigned long long strtoull(const char *s, char **end, int base)
{
    int neg, of;
    unsigned long long v = parse_ull(s, end, base, &neg, &of);
    if (of) {
        *__errno_location() = ERANGE;
        return ~0ULL;
    }
    return neg ? 0ULL - v : v;
}

long strtol(const char *s, char **end, int base)
{
    return strtoll(s, end, base);
}

unsigned long strtoul(const char *s, char **end, int base)
{
    return strtoull(s, end, base);
}

long long strtoimax(const char *s, char **end, int base) __attribute__((alias("strtoll")));
unsigned long long strtoumax(const char *s, char **end, int base) __attribute__((alias("strtoull")));

int atoi(const char *s)
{
    return (int)strtol(s, 0, 10);
}

long atol(const char *s)
{
    return strtol(s, 0, 10);
}

long long atoll(const char *s)
{
    return strtoll(s, 0, 10);
}

static int lower_eq(const char *p, const char *word)
{
    for (; *word; p++, word++)
        if ((*p | 0x20) != *word)
            return 0;
    return 1;
}

double strtod(const char *s, char **end)
{
    const char *p = s;
    while (isspace_(*p))
        p++;
    int neg = 0;
    if (*p == '+' || *p == '-')
        neg = *p++ == '-';
    if (lower_eq(p, "inf")) {
        p += lower_eq(p, "infinity") ? 8 : 3;
        if (end)
            *end = (char *)p;
        return neg ? -__builtin_inf() : __builtin_inf();
    }
    if (lower_eq(p, "nan")) {
        if (end)
            *end = (char *)(p + 3);
        return __builtin_nan("");
    }
    unsigned long long mant = 0;
    int digits = 0, exp10 = 0, any = 0, dot = 0;
    /* Up to 19 significant digits; the rest only move the decimal exponent. */
    for (;; p++) {
        if (*p == '.' && !dot) {
            dot = 1;
            continue;
        }
        if (*p < '0' || *p > '9')
            break;
        any = 1;
        if (digits < 19) {
            mant = mant * 10 + (unsigned)(*p - '0');
            if (mant)
                digits++;
            if (dot)
                exp10--;
        } else if (!dot) {
            exp10++;
        }
    }
    if (!any) {
        if (end)
            *end = (char *)s;
        return 0.0;
    }
    if (*p == 'e' || *p == 'E') {
        const char *q = p + 1;
        int eneg = 0, e = 0;
        if (*q == '+' || *q == '-')
            eneg = *q++ == '-';
        if (*q >= '0' && *q <= '9') {
            while (*q >= '0' && *q <= '9') {
                if (e < 10000)
                    e = e * 10 + (*q - '0');
                q++;
            }
            exp10 += eneg ? -e : e;
            p = q;
        }
    }
    if (end)
        *end = (char *)p;
    static const double pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                   1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    double v = (double)mant;
    if (v != 0.0) {
        int e = exp10;
        while (e > 22) {
            v *= 1e22;
            e -= 22;
            if (v > 1.7976931348623157e308)
                break;
        }
        while (e < -22) {
            v /= 1e22;
            e += 22;
            if (v == 0.0)
                break;
        }
        if (e > 0)
            v *= pow10[e];
        else if (e < 0)
            v /= pow10[-e];
        if (v > 1.7976931348623157e308 || v == 0.0)
            *__errno_location() = ERANGE;
    }
    return neg ? -v : v;
}

float strtof(const char *s, char **end)
{
    return (float)strtod(s, end);
}

long double strtold(const char *s, char **end)
{
    return strtod(s, end);
}

double atof(const char *s)
{
    return strtod(s, 0);
}

/* glibc's rand: the additive feedback generator of random(3) (TYPE_3, 31 words), seeded as
 * srandom does, so a seeded program draws the same numbers as under glibc. */
static int32_t rstate[31];
static int rf = 3, rr = 0, rseeded;
static volatile int rlock;

static void seed_locked(unsigned seed)
{
    int32_t word = seed ? (int32_t)seed : 1;
    rstate[0] = word;
    for (int i = 1; i < 31; i++) {
        int32_t hi = word / 127773, lo = word % 127773;
        word = 16807 * lo - 2836 * hi;
        if (word < 0)
            word += 2147483647;
        rstate[i] = word;
    }
    rf = 3;
    rr = 0;
    rseeded = 1;
    for (int i = 0; i < 310; i++) {
        rstate[rf] = (int32_t)((uint32_t)rstate[rf] + (uint32_t)rstate[rr]);
        rf = (rf + 1) % 31;
        rr = (rr + 1) % 31;
    }
}

static void rlock_take(void)
{
    while (__atomic_exchange_n(&rlock, 1, __ATOMIC_ACQUIRE))
        __builtin_ia32_pause();
}

void srandom(unsigned seed)
{
    rlock_take();
    seed_locked(seed);
    __atomic_store_n(&rlock, 0, __ATOMIC_RELEASE);
}

void srand(unsigned seed)
{
    srandom(seed);
}

long random(void)
{
    rlock_take();
    if (!rseeded)
        seed_locked(1);
    uint32_t v = (uint32_t)rstate[rf] + (uint32_t)rstate[rr];
    rstate[rf] = (int32_t)v;
    rf = (rf + 1) % 31;
    rr = (rr + 1) % 31;
    __atomic_store_n(&rlock, 0, __ATOMIC_RELEASE);
    return (long)(v >> 1);
}

int rand(void)
{
    return (int)random();
}

int rand_r(unsigned *seed)
{
    unsigned next = *seed;
    int result;
    next = next * 1103515245 + 12345;
    result = (int)((next / 65536) % 2048);
    next = next * 1103515245 + 12345;
    result <<= 10;
    result ^= (int)((next / 65536) % 1024);
    next = next * 1103515245 + 12345;
    result <<= 10;
    result ^= (int)((next / 65536) % 1024);
    *seed = next;
    return result;
}

int abs(int v)
{
    return v < 0 ? -v : v;
}

long labs(long v)
{
    return v < 0 ? -v : v;
}

long long llabs(long long v)
{
    return v < 0 ? -v : v;
}

static void swap_bytes(char *a, char *b, size_t n)
{
    while (n--) {
        char t = *a;
        *a++ = *b;
        *b++ = t;
    }
}

/* Moves the element at `root` down the max-heap of the first `n` elements. */
static void sift_down(char *b, size_t root, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
    while (2 * root + 1 < n) {
        size_t child = 2 * root + 1;
        if (child + 1 < n && cmp(b + child * size, b + (child + 1) * size) < 0)
            child++;
        if (cmp(b + root * size, b + child * size) >= 0)
            return;
        swap_bytes(b + root * size, b + child * size, size);
        root = child;
    }
}

/* Heapsort: in place, O(n log n), no recursion. */
void qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
    char *b = base;
    if (n < 2)
        return;
    for (size_t start = n / 2; start-- > 0;)
        sift_down(b, start, n, size, cmp);
    for (size_t end = n - 1; end > 0; end--) {
        swap_bytes(b, b + end * size, size);
        sift_down(b, 0, end, size, cmp);
    }
}

void *bsearch(const void *key, const void *base, size_t n, size_t size, int (*cmp)(const void *, const void *))
{
    const char *b = base;
    while (n > 0) {
        const char *mid = b + (n / 2) * size;
        int c = cmp(key, mid);
        if (c == 0)
            return (void *)mid;
        if (c > 0) {
            b = mid + size;
            n -= n / 2 + 1;
        } else {
            n /= 2;
        }
    }
    return 0;
}

char *getenv(const char *name)
{
    (void)name;
    return 0;
}

int system(const char *cmd)
{
    (void)cmd;
    return -1;
}

/* atexit and __cxa_atexit handlers, run in reverse order by exit. */
#define MAX_ATEXIT 64
static struct {
    void (*f)(void *);
    void *arg;
} handlers[MAX_ATEXIT];
static int nhandlers;
static volatile int hlock;

int __cxa_atexit(void (*f)(void *), void *arg, void *dso)
{
    (void)dso;
    while (__atomic_exchange_n(&hlock, 1, __ATOMIC_ACQUIRE))
        __builtin_ia32_pause();
    int ok = nhandlers < MAX_ATEXIT;
    if (ok) {
        handlers[nhandlers].f = f;
        handlers[nhandlers].arg = arg;
        nhandlers++;
    }
    __atomic_store_n(&hlock, 0, __ATOMIC_RELEASE);
    return ok ? 0 : -1;
}

static void call_plain(void *f)
{
    ((void (*)(void))f)();
}

int atexit(void (*f)(void))
{
    return __cxa_atexit(call_plain, (void *)f, 0);
}

void *__dso_handle = &__dso_handle;

static int exiting;

void exit(int status)
{
    /* Only the first caller runs the handlers; another thread exiting meanwhile just ends. */
    if (__atomic_exchange_n(&exiting, 1, __ATOMIC_ACQ_REL) == 0) {
        while (nhandlers > 0) {
            nhandlers--;
            handlers[nhandlers].f(handlers[nhandlers].arg);
        }
    }
    crt_flush_all();
    __cbench_exit(status);
}

void _exit(int status)
{
    crt_flush_all();
    __cbench_exit(status);
}

void _Exit(int status) __attribute__((alias("_exit")));

void abort(void)
{
    crt_flush_all();
    __cbench_abort();
}

void __assert_fail(const char *expr, const char *file, unsigned line, const char *func)
{
    int fprintf(void *f, const char *fmt, ...);
    extern void *stderr;
    fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
    abort();
}

/* The constructors of the linked programs (the linker script collects them). */
extern void (*__init_array_start[])(void);
extern void (*__init_array_end[])(void);

/* A program's main thread: constructors, main, exit. */
void __cbench_main(int (*main_fn)(int, char **), int argc, char **argv)
{
    for (void (**f)(void) = __init_array_start; f < __init_array_end; f++)
        (*f)();
    exit(main_fn(argc, argv));
}
