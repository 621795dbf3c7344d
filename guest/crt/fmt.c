/* printf-style formatting: flags, width, precision, length modifiers, integers, strings,
 * pointers and floating point (%f %e %g %a as %e), without any allocation. */
#include "crt.h"

struct out {
    crt_sink sink;
    void *ctx;
    int count;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (n) {
        o->sink(o->ctx, s, n);
        o->count += (int)n;
    }
}

static void pad(struct out *o, char c, int n)
{
    char buf[32];
    for (int i = 0; i < 32; i++)
        buf[i] = c;
    while (n > 0) {
        int k = n > 32 ? 32 : n;
        put(o, buf, (size_t)k);
        n -= k;
    }
}

enum { F_MINUS = 1, F_PLUS = 2, F_SPACE = 4, F_HASH = 8, F_ZERO = 16 };

/* Emits sign/prefix, zero padding and digits, padded to width. */
static void emit(struct out *o, int flags, int width, const char *prefix, const char *body, size_t blen, int zeros)
{
    size_t plen = strlen(prefix);
    int total = (int)(plen + blen) + zeros;
    if (!(flags & F_MINUS) && !(flags & F_ZERO))
        pad(o, ' ', width - total);
    put(o, prefix, plen);
    if (!(flags & F_MINUS) && (flags & F_ZERO))
        pad(o, '0', width - total);
    pad(o, '0', zeros);
    put(o, body, blen);
    if (flags & F_MINUS)
        pad(o, ' ', width - total);
}

static void fmt_int(struct out *o, unsigned long long v, int neg, int base, int upper, int flags, int width, int prec)
{
    char buf[72];
    int i = 72;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    if (!(v == 0 && prec == 0)) {
        do {
            buf[--i] = digits[v % (unsigned)base];
            v /= (unsigned)base;
        } while (v);
    }
    int len = 72 - i;
    char prefix[4] = {0};
    int p = 0;
    if (neg)
        prefix[p++] = '-';
    else if (flags & F_PLUS)
        prefix[p++] = '+';
    else if (flags & F_SPACE)
        prefix[p++] = ' ';
    if ((flags & F_HASH) && base == 16 && len > 0 && !(len == 1 && buf[71] == '0')) {
        prefix[p++] = '0';
        prefix[p++] = upper ? 'X' : 'x';
    }
    if ((flags & F_HASH) && base == 8 && (len == 0 || buf[i] != '0'))
        buf[--i] = '0', len++;
    int zeros = prec > len ? prec - len : 0;
    if (prec >= 0)
        flags &= ~F_ZERO;
    emit(o, flags, width, prefix, buf + i, (size_t)len, zeros);
}

/* Decimal digits of a double in [0, 1e19): integer part and `prec` fraction digits, rounded. */
static int fixed_digits(char *buf, double v, int prec, int hash)
{
    double r = 0.5;
    for (int k = 0; k < prec; k++)
        r /= 10.0;
    v += r;
    unsigned long long ip = (unsigned long long)v;
    double frac = v - (double)ip;
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + ip % 10);
        ip /= 10;
    } while (ip);
    int len = 0;
    while (n)
        buf[len++] = tmp[--n];
    if (prec > 0 || hash)
        buf[len++] = '.';
    for (int k = 0; k < prec; k++) {
        frac *= 10.0;
        int d = (int)frac;
        if (d > 9)
            d = 9;
        buf[len++] = (char)('0' + d);
        frac -= d;
    }
    return len;
}

/* v = m * 10^e with m in [1, 10) (v > 0, finite). */
static double normalize(double v, int *e)
{
    int x = 0;
    while (v >= 1e16) {
        v /= 1e16;
        x += 16;
    }
    while (v >= 10.0) {
        v /= 10.0;
        x++;
    }
    while (v < 1e-16) {
        v *= 1e16;
        x -= 16;
    }
    while (v < 1.0) {
        v *= 10.0;
        x--;
    }
    *e = x;
    return v;
}

static int exp_digits(char *buf, double v, int prec, int hash, int upper)
{
    int e = 0;
    double m = v == 0.0 ? 0.0 : normalize(v, &e);
    /* Rounding may carry into a new digit: 9.99.. -> 10.0. */
    double r = 0.5;
    for (int k = 0; k < prec; k++)
        r /= 10.0;
    if (m + r >= 10.0) {
        m /= 10.0;
        e++;
    }
    int len = fixed_digits(buf, m, prec, hash);
    buf[len++] = upper ? 'E' : 'e';
    buf[len++] = e < 0 ? '-' : '+';
    int ae = e < 0 ? -e : e;
    if (ae >= 100)
        buf[len++] = (char)('0' + ae / 100);
    buf[len++] = (char)('0' + ae / 10 % 10);
    buf[len++] = (char)('0' + ae % 10);
    return len;
}

static int strip_zeros(char *buf, int len)
{
    int dot = -1, epos = len;
    for (int i = 0; i < len; i++) {
        if (buf[i] == '.')
            dot = i;
        if (buf[i] == 'e' || buf[i] == 'E') {
            epos = i;
            break;
        }
    }
    if (dot < 0)
        return len;
    int end = epos;
    while (end > dot + 1 && buf[end - 1] == '0')
        end--;
    if (end == dot + 1)
        end = dot;
    int n = end;
    for (int i = epos; i < len; i++)
        buf[n++] = buf[i];
    return n;
}

static void fmt_float(struct out *o, double v, char conv, int flags, int width, int prec)
{
    char buf[400];
    int len;
    int upper = conv == 'F' || conv == 'E' || conv == 'G' || conv == 'A';
    int neg = v < 0.0 || (v == 0.0 && 1.0 / v < 0.0);
    if (neg)
        v = -v;
    const char *prefix = neg ? "-" : (flags & F_PLUS) ? "+" : (flags & F_SPACE) ? " " : "";
    if (v != v || v > 1.7976931348623157e308) {
        const char *s = v != v ? (upper ? "NAN" : "nan") : (upper ? "INF" : "inf");
        emit(o, flags & ~F_ZERO, width, prefix, s, 3, 0);
        return;
    }
    if (prec < 0)
        prec = 6;
    if (prec > 60)
        prec = 60;
    switch (conv) {
    case 'f':
    case 'F':
        if (v < 1e19) {
            len = fixed_digits(buf, v, prec, flags & F_HASH);
        } else {
            /* Beyond 64-bit integers: digits from the exponent form, zeros after. */
            int e;
            double m = normalize(v, &e);
            len = 0;
            for (int i = 0; i <= e && len < 330; i++) {
                int d = i < 17 ? (int)m : 0;
                buf[len++] = (char)('0' + d);
                m = (m - d) * 10.0;
            }
            if (prec > 0 || (flags & F_HASH))
                buf[len++] = '.';
            for (int i = 0; i < prec; i++)
                buf[len++] = '0';
        }
        break;
    case 'e':
    case 'E':
    case 'a':
    case 'A':
        len = exp_digits(buf, v, prec, flags & F_HASH, upper);
        break;
    default: { /* g, G */
        int p = prec == 0 ? 1 : prec;
        int x = 0;
        if (v != 0.0) {
            /* The exponent %e would print, after rounding to p digits. */
            char tmp[64];
            int tl = exp_digits(tmp, v, p - 1, 0, 0);
            int i = tl - 1, mul = 1;
            x = 0;
            while (tmp[i] >= '0' && tmp[i] <= '9') {
                x += (tmp[i] - '0') * mul;
                mul *= 10;
                i--;
            }
            if (tmp[i] == '-')
                x = -x;
        }
        if (p > x && x >= -4)
            len = fixed_digits(buf, v, p - 1 - x, flags & F_HASH);
        else
            len = exp_digits(buf, v, p - 1, flags & F_HASH, upper);
        if (!(flags & F_HASH))
            len = strip_zeros(buf, len);
    }
    }
    emit(o, flags, width, prefix, buf, (size_t)len, 0);
}

int crt_format(crt_sink sink, void *ctx, const char *f, va_list ap)
{
    struct out o = {sink, ctx, 0};
    while (*f) {
        const char *start = f;
        while (*f && *f != '%')
            f++;
        put(&o, start, (size_t)(f - start));
        if (!*f)
            break;
        f++;
        int flags = 0;
        for (;; f++) {
            if (*f == '-')
                flags |= F_MINUS;
            else if (*f == '+')
                flags |= F_PLUS;
            else if (*f == ' ')
                flags |= F_SPACE;
            else if (*f == '#')
                flags |= F_HASH;
            else if (*f == '0')
                flags |= F_ZERO;
            else
                break;
        }
        int width = 0;
        if (*f == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= F_MINUS;
                width = -width;
            }
            f++;
        } else {
            while (*f >= '0' && *f <= '9')
                width = width * 10 + (*f++ - '0');
        }
        int prec = -1;
        if (*f == '.') {
            f++;
            prec = 0;
            if (*f == '*') {
                prec = va_arg(ap, int);
                f++;
            } else {
                while (*f >= '0' && *f <= '9')
                    prec = prec * 10 + (*f++ - '0');
            }
        }
        int lng = 0; /* 0 int, 1 long, 2 long long, -1 short, -2 char, 3 size_t/ptrdiff/intmax */
        int ldbl = 0;
        for (;; f++) {
            if (*f == 'l')
                lng++;
            else if (*f == 'h')
                lng--;
            else if (*f == 'z' || *f == 't' || *f == 'j' || *f == 'q')
                lng = 2;
            else if (*f == 'L')
                ldbl = 1;
            else
                break;
        }
        char c = *f++;
        switch (c) {
        case 'd':
        case 'i': {
            long long v;
            if (lng >= 1)
                v = lng == 1 ? va_arg(ap, long) : va_arg(ap, long long);
            else
                v = va_arg(ap, int);
            if (lng == -1)
                v = (short)v;
            else if (lng == -2)
                v = (signed char)v;
            unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
            fmt_int(&o, u, v < 0, 10, 0, flags, width, prec);
            break;
        }
        case 'u':
        case 'x':
        case 'X':
        case 'o': {
            unsigned long long v;
            if (lng >= 1)
                v = lng == 1 ? va_arg(ap, unsigned long) : va_arg(ap, unsigned long long);
            else
                v = va_arg(ap, unsigned int);
            if (lng == -1)
                v = (unsigned short)v;
            else if (lng == -2)
                v = (unsigned char)v;
            int base = c == 'o' ? 8 : c == 'u' ? 10 : 16;
            fmt_int(&o, v, 0, base, c == 'X', flags & ~(F_PLUS | F_SPACE), width, prec);
            break;
        }
        case 'p': {
            void *p = va_arg(ap, void *);
            if (!p)
                emit(&o, flags & ~F_ZERO, width, "", "(nil)", 5, 0);
            else
                fmt_int(&o, (unsigned long long)(uintptr_t)p, 0, 16, 0, flags | F_HASH, width, prec);
            break;
        }
        case 'c': {
            char ch = (char)va_arg(ap, int);
            emit(&o, flags & ~F_ZERO, width, "", &ch, 1, 0);
            break;
        }
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t n = 0;
            while (s[n] && (prec < 0 || n < (size_t)prec))
                n++;
            emit(&o, flags & ~F_ZERO, width, "", s, n, 0);
            break;
        }
        case 'f':
        case 'F':
        case 'e':
        case 'E':
        case 'g':
        case 'G':
        case 'a':
        case 'A': {
            double v = ldbl ? (double)va_arg(ap, long double) : va_arg(ap, double);
            fmt_float(&o, v, c, flags, width, prec);
            break;
        }
        case 'n': {
            int *p = va_arg(ap, int *);
            if (p)
                *p = o.count;
            break;
        }
        case '%':
            put(&o, "%", 1);
            break;
        default:
            /* Unknown conversion: print it as written. */
            put(&o, "%", 1);
            if (c)
                put(&o, &c, 1);
            else
                f--;
            break;
        }
    }
    return o.count;
}
