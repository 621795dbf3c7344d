/* The C runtime under load: many more threads than vCPUs, each using mutexes, condition
 * variables, a barrier, once, thread-specific data, timed waits, sleeps and detached threads;
 * printf with integers and floating point; strtod, getopt-free parsing, rand. Prints "ok" and
 * exits 0 only if every check holds. Usage: threads [vcpus] */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 2000

static int failures;
#define CHECK(c)                                                                 \
    do {                                                                         \
        if (!(c)) {                                                              \
            printf("check failed at line %d: %s\n", __LINE__, #c);               \
            __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);                  \
        }                                                                        \
    } while (0)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t barrier;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_key_t key;
static long counter;
static int once_calls;
static int queue[16], head, tail;
static int detached_done;

static void init_once(void) { once_calls++; }

static volatile sig_atomic_t alarmed;
static void on_alarm(int sig) { alarmed = sig; }

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *worker(void *arg)
{
    long id = (long)arg;
    pthread_once(&once, init_once);
    pthread_setspecific(key, (void *)(id + 1));
    for (int i = 0; i < ROUNDS; i++) {
        pthread_mutex_lock(&lock);
        counter++;
        pthread_mutex_unlock(&lock);
        if (i % 500 == 0)
            sched_yield();
    }
    /* Every thread's allocations stay its own. */
    char *blocks[64];
    for (int i = 0; i < 64; i++) {
        blocks[i] = malloc(16 + i * 40);
        memset(blocks[i], (int)id, 16 + i * 40);
    }
    usleep(1000);
    for (int i = 0; i < 64; i++) {
        for (int j = 0; j < 16 + i * 40; j++)
            if (blocks[i][j] != (char)id) {
                CHECK(!"a block changed under its thread");
                break;
            }
        free(blocks[i]);
    }
    CHECK(pthread_getspecific(key) == (void *)(id + 1));
    /* errno is the thread's own. */
    errno = (int)id + 1000;
    sched_yield();
    usleep(100);
    CHECK(errno == (int)id + 1000);
    pthread_barrier_wait(&barrier);
    return (void *)(id * 2);
}

static void *producer(void *arg)
{
    int n = (int)(long)arg;
    for (int i = 1; i <= n; i++) {
        pthread_mutex_lock(&lock);
        while ((tail + 1) % 16 == head)
            pthread_cond_wait(&cond, &lock);
        queue[tail] = i;
        tail = (tail + 1) % 16;
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&lock);
    }
    return 0;
}

/* Spinners never block or yield: only preemption lets anyone else run. */
static volatile int spin_flag;

static void *spinner(void *arg)
{
    (void)arg;
    while (!spin_flag)
        ;
    return 0;
}

static void *setter(void *arg)
{
    (void)arg;
    spin_flag = 1;
    return 0;
}

static void *detached(void *arg)
{
    (void)arg;
    usleep(2000);
    __atomic_fetch_add(&detached_done, 1, __ATOMIC_RELAXED);
    return 0;
}

int main(int argc, char **argv)
{
    int cpus = argc > 1 ? atoi(argv[1]) : 2;
    int nthreads = 4 * cpus + 1;
    CHECK(sysconf(_SC_NPROCESSORS_ONLN) == cpus);
    CHECK(pthread_key_create(&key, 0) == 0);
    CHECK(pthread_barrier_init(&barrier, 0, (unsigned)nthreads) == 0);

    double t0 = now();
    pthread_t th[64];
    for (long i = 0; i < nthreads; i++)
        CHECK(pthread_create(&th[i], 0, worker, (void *)i) == 0);
    for (long i = 0; i < nthreads; i++) {
        void *ret;
        CHECK(pthread_join(th[i], &ret) == 0);
        CHECK(ret == (void *)(i * 2));
    }
    CHECK(counter == (long)nthreads * ROUNDS);
    CHECK(once_calls == 1);

    /* A bounded queue: a producer and this thread, waiting on one condition. */
    pthread_t prod;
    int items = 5000;
    pthread_create(&prod, 0, producer, (void *)(long)items);
    long sum = 0;
    for (int got = 0; got < items; got++) {
        pthread_mutex_lock(&lock);
        while (head == tail)
            pthread_cond_wait(&cond, &lock);
        sum += queue[head];
        head = (head + 1) % 16;
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&lock);
    }
    pthread_join(prod, 0);
    CHECK(sum == (long)items * (items + 1) / 2);

    /* A timed wait that times out, after about 20 ms. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20 * 1000 * 1000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    double w0 = now();
    pthread_mutex_lock(&lock);
    int rc = pthread_cond_timedwait(&cond, &lock, &ts);
    pthread_mutex_unlock(&lock);
    double waited = now() - w0;
    CHECK(rc == ETIMEDOUT);
    CHECK(waited >= 0.015 && waited < 0.5);

    /* Detached threads end on their own. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < 8; i++) {
        pthread_t t;
        CHECK(pthread_create(&t, &attr, detached, 0) == 0);
    }
    for (int i = 0; i < 200 && __atomic_load_n(&detached_done, __ATOMIC_RELAXED) < 8; i++)
        usleep(1000);
    CHECK(detached_done == 8);

    /* Sleeping blocks the thread for about as long as asked. */
    double s0 = now();
    usleep(30000);
    double slept = now() - s0;
    CHECK(slept >= 0.029 && slept < 0.5);

    /* As many busy spinners as vCPUs: this thread and the one that stops them get a vCPU only
     * by preemption. */
    pthread_t spinners[64], set;
    for (int i = 0; i < cpus; i++)
        CHECK(pthread_create(&spinners[i], 0, spinner, 0) == 0);
    usleep(10000);
    CHECK(pthread_create(&set, 0, setter, 0) == 0);
    for (int i = 0; i < cpus; i++)
        pthread_join(spinners[i], 0);
    pthread_join(set, 0);
    CHECK(spin_flag == 1);

    /* An alarm interrupts whatever runs and calls its handler. */
    signal(SIGALRM, on_alarm);
    double a0 = now();
    alarm(1);
    while (!alarmed && now() - a0 < 5.0)
        usleep(10000);
    CHECK(alarmed == SIGALRM);
    CHECK(now() - a0 >= 0.9);

    /* Numbers in and out. */
    char buf[128];
    snprintf(buf, sizeof buf, "%.3f|%g|%e|%5d|%-4s|%x|%lu", 3.14159, 0.0001, 12345.678, 42, "ab", 255, 123456789012UL);
    CHECK(strcmp(buf, "3.142|0.0001|1.234568e+04|   42|ab  |ff|123456789012") == 0);
    CHECK(strtod("2.5e3", 0) == 2500.0);
    CHECK(strtol("-0x1f", 0, 16) == -31);
    srand(1);
    CHECK(rand() == 1804289383);
    CHECK(rand() == 846930886);

    struct rusage ru;
    CHECK(getrusage(RUSAGE_SELF, &ru) == 0);
    CHECK(ru.ru_maxrss > 0);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6;
    double wall = now() - t0;
    CHECK(cpu > 0.0 && cpu <= wall * cpus + 0.1);

    printf("threads: %d threads on %d vCPUs, %.1f ms, cpu %.1f ms: %s\n", nthreads + 10 + cpus, cpus, wall * 1e3, cpu * 1e3,
           failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
