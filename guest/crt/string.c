/* Strings, character classes (with glibc's ctype tables, which its header macros index) and
 * error names. memcpy, memmove, memset and memcmp come from the Rust side's compiler_builtins. */
#include "crt.h"

size_t strlen(const char *s)
{
    const char *p = s;
    while (*p)
        p++;
    return (size_t)(p - s);
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b || !*a)
            return (unsigned char)*a - (unsigned char)*b;
    }
    return 0;
}

static int lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

int strcasecmp(const char *a, const char *b)
{
    while (*a && lower(*a) == lower(*b))
        a++, b++;
    return lower((unsigned char)*a) - lower((unsigned char)*b);
}

int strncasecmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (lower(*a) != lower(*b) || !*a)
            return lower((unsigned char)*a) - lower((unsigned char)*b);
    }
    return 0;
}

char *strcpy(char *d, const char *s)
{
    char *r = d;
    while ((*d++ = *s++))
        ;
    return r;
}

char *strncpy(char *d, const char *s, size_t n)
{
    size_t i = 0;
    for (; i < n && s[i]; i++)
        d[i] = s[i];
    for (; i < n; i++)
        d[i] = 0;
    return d;
}

char *strcat(char *d, const char *s)
{
    strcpy(d + strlen(d), s);
    return d;
}

char *strncat(char *d, const char *s, size_t n)
{
    char *p = d + strlen(d);
    size_t i = 0;
    for (; i < n && s[i]; i++)
        p[i] = s[i];
    p[i] = 0;
    return d;
}

char *strchr(const char *s, int c)
{
    for (;; s++) {
        if (*s == (char)c)
            return (char *)s;
        if (!*s)
            return 0;
    }
}

char *strrchr(const char *s, int c)
{
    const char *r = 0;
    for (;; s++) {
        if (*s == (char)c)
            r = s;
        if (!*s)
            return (char *)r;
    }
}

void *memchr(const void *s, int c, size_t n)
{
    const unsigned char *p = s;
    for (; n; n--, p++)
        if (*p == (unsigned char)c)
            return (void *)p;
    return 0;
}

char *strstr(const char *h, const char *n)
{
    size_t len = strlen(n);
    if (!len)
        return (char *)h;
    for (; *h; h++)
        if (*h == *n && strncmp(h, n, len) == 0)
            return (char *)h;
    return 0;
}

size_t strspn(const char *s, const char *accept)
{
    size_t n = 0;
    while (s[n] && strchr(accept, s[n]))
        n++;
    return n;
}

size_t strcspn(const char *s, const char *reject)
{
    size_t n = 0;
    while (s[n] && !strchr(reject, s[n]))
        n++;
    return n;
}

char *strpbrk(const char *s, const char *accept)
{
    s += strcspn(s, accept);
    return *s ? (char *)s : 0;
}

char *strtok_r(char *s, const char *delim, char **save)
{
    if (!s)
        s = *save;
    s += strspn(s, delim);
    if (!*s) {
        *save = s;
        return 0;
    }
    char *end = s + strcspn(s, delim);
    if (*end)
        *end++ = 0;
    *save = end;
    return s;
}

char *strtok(char *s, const char *delim)
{
    static char *save;
    return strtok_r(s, delim, &save);
}

char *strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

char *strndup(const char *s, size_t max)
{
    size_t n = strnlen(s, max);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

void bzero(void *p, size_t n)
{
    memset(p, 0, n);
}

const char *strerror(int e)
{
    switch (e) {
    case 0:
        return "Success";
    case 1:
        return "Operation not permitted";
    case 2:
        return "No such file or directory";
    case 4:
        return "Interrupted system call";
    case 9:
        return "Bad file descriptor";
    case 11:
        return "Resource temporarily unavailable";
    case 12:
        return "Cannot allocate memory";
    case 16:
        return "Device or resource busy";
    case 22:
        return "Invalid argument";
    case 34:
        return "Numerical result out of range";
    case 35:
        return "Resource deadlock avoided";
    case 38:
        return "Function not implemented";
    case 110:
        return "Connection timed out";
    default:
        return "Unknown error";
    }
}

/* glibc's <ctype.h> macros index these tables at [-128, 255]. */
enum {
    IS_UPPER = 0x100,
    IS_LOWER = 0x200,
    IS_ALPHA = 0x400,
    IS_DIGIT = 0x800,
    IS_XDIGIT = 0x1000,
    IS_SPACE = 0x2000,
    IS_PRINT = 0x4000,
    IS_GRAPH = 0x8000,
    IS_BLANK = 0x1,
    IS_CNTRL = 0x2,
    IS_PUNCT = 0x4,
    IS_ALNUM = 0x8,
};

static unsigned short ctype_b[384];
static int32_t ctype_lower[384], ctype_upper[384];
static const unsigned short *ctype_b_ptr;
static const int32_t *ctype_lower_ptr, *ctype_upper_ptr;

static void ctype_init(void)
{
    for (int i = -128; i < 256; i++) {
        int c = i;
        unsigned short m = 0;
        int up = c >= 'A' && c <= 'Z', lo = c >= 'a' && c <= 'z', dg = c >= '0' && c <= '9';
        int sp = c == ' ' || (c >= '\t' && c <= '\r');
        int pr = c >= 32 && c < 127;
        if (up)
            m |= IS_UPPER | IS_ALPHA | IS_ALNUM;
        if (lo)
            m |= IS_LOWER | IS_ALPHA | IS_ALNUM;
        if (dg)
            m |= IS_DIGIT | IS_ALNUM | IS_XDIGIT;
        if ((c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
            m |= IS_XDIGIT;
        if (sp)
            m |= IS_SPACE;
        if (c == ' ' || c == '\t')
            m |= IS_BLANK;
        if (pr)
            m |= IS_PRINT;
        if (pr && c != ' ')
            m |= IS_GRAPH;
        if (pr && c != ' ' && !up && !lo && !dg)
            m |= IS_PUNCT;
        if ((c >= 0 && c < 32) || c == 127)
            m |= IS_CNTRL;
        ctype_b[i + 128] = m;
        ctype_lower[i + 128] = up ? c + 32 : c;
        ctype_upper[i + 128] = lo ? c - 32 : c;
    }
    ctype_b_ptr = ctype_b + 128;
    ctype_lower_ptr = ctype_lower + 128;
    ctype_upper_ptr = ctype_upper + 128;
}

const unsigned short **__ctype_b_loc(void)
{
    if (!ctype_b_ptr)
        ctype_init();
    return &ctype_b_ptr;
}

const int32_t **__ctype_tolower_loc(void)
{
    if (!ctype_b_ptr)
        ctype_init();
    return &ctype_lower_ptr;
}

const int32_t **__ctype_toupper_loc(void)
{
    if (!ctype_b_ptr)
        ctype_init();
    return &ctype_upper_ptr;
}

int tolower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

int toupper(int c)
{
    return c >= 'a' && c <= 'z' ? c - 32 : c;
}

int isdigit(int c)
{
    return c >= '0' && c <= '9';
}

int isspace(int c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

int isalpha(int c)
{
    return (c | 32) >= 'a' && (c | 32) <= 'z';
}

int isalnum(int c)
{
    return isalpha(c) || isdigit(c);
}

int isprint(int c)
{
    return c >= 32 && c < 127;
}
