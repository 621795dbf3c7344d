/* The few libm functions the benchmarks call, exact for doubles. */

double fabs(double x)
{
    return x < 0 ? -x : x;
}

double trunc(double x)
{
    if (!(fabs(x) < 4503599627370496.0)) /* 2^52: already integral (or nan, inf) */
        return x;
    return (double)(long long)x;
}

double floor(double x)
{
    double t = trunc(x);
    return t > x ? t - 1.0 : t;
}

double ceil(double x)
{
    double t = trunc(x);
    return t < x ? t + 1.0 : t;
}

double round(double x)
{
    if (!(fabs(x) < 4503599627370496.0))
        return x;
    double t = trunc(x);
    double d = x - t;
    if (d >= 0.5)
        t += 1.0;
    else if (d <= -0.5)
        t -= 1.0;
    return t;
}

long lround(double x)
{
    return (long)round(x);
}

long long llround(double x)
{
    return (long long)round(x);
}

double sqrt(double x)
{
    double r;
    __asm__("sqrtsd %1, %0" : "=x"(r) : "x"(x));
    return r;
}

double fmod(double x, double y)
{
    if (y == 0.0)
        return __builtin_nan("");
    return x - trunc(x / y) * y;
}
