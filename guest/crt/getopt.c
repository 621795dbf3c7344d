/* POSIX getopt: clustered options, required arguments ("a:"), "--", errors on stderr. */
#include "crt.h"

char *optarg;
int optind = 1, opterr = 1, optopt;
static int pos = 1;

int fprintf(void *f, const char *fmt, ...);
extern void *stderr;
char *strchr(const char *s, int c);

int getopt(int argc, char *const argv[], const char *opts)
{
    optarg = 0;
    if (optind >= argc || !argv[optind] || argv[optind][0] != '-' || !argv[optind][1])
        return -1;
    if (argv[optind][1] == '-' && !argv[optind][2]) {
        optind++;
        return -1;
    }
    int quiet = opts[0] == ':';
    char c = argv[optind][pos];
    const char *spec = c == ':' ? 0 : strchr(opts, c);
    pos++;
    int last = !argv[optind][pos];
    if (!spec) {
        optopt = c;
        if (opterr && !quiet)
            fprintf(stderr, "%s: invalid option -- '%c'\n", argv[0], c);
        if (last) {
            optind++;
            pos = 1;
        }
        return '?';
    }
    if (spec[1] == ':') {
        if (!last) {
            optarg = &argv[optind][pos];
        } else if (optind + 1 < argc) {
            optarg = argv[++optind];
        } else {
            optopt = c;
            optind++;
            pos = 1;
            if (quiet)
                return ':';
            if (opterr)
                fprintf(stderr, "%s: option requires an argument -- '%c'\n", argv[0], c);
            return '?';
        }
        optind++;
        pos = 1;
    } else if (last) {
        optind++;
        pos = 1;
    }
    return c;
}
