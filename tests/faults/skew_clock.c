/*
 * A wall clock set off by TXBUS_SKEW_SECONDS (a whole number, negative for behind), for the
 * clock-skew scenario of the fault suite (skew.rs). Loaded with LD_PRELOAD into a child process,
 * it moves what clock_gettime(CLOCK_REALTIME...), gettimeofday and time return; the monotonic
 * clocks are left alone, as they are no application clock.
 *
 * Built by the test itself: cc -shared -fPIC skew_clock.c -o skew_clock.so -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static long offset;

/* Runs when the library is loaded, before the program's own code and threads. */
__attribute__((constructor)) static void init(void) {
    const char *value = getenv("TXBUS_SKEW_SECONDS");
    offset = value ? strtol(value, NULL, 10) : 0;
    real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
}

static int real_now(clockid_t clock, struct timespec *ts) {
    if (!real_clock_gettime) {
        init();
    }
    return real_clock_gettime(clock, ts);
}

static int is_wall_clock(clockid_t clock) {
    return clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE
#ifdef CLOCK_TAI
           || clock == CLOCK_TAI
#endif
        ;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    int result = real_now(clock, ts);
    if (result == 0 && is_wall_clock(clock)) {
        ts->tv_sec += offset;
    }
    return result;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    (void)tz;
    if (real_now(CLOCK_REALTIME, &ts) != 0) {
        return -1;
    }
    tv->tv_sec = ts.tv_sec + offset;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (real_now(CLOCK_REALTIME, &ts) != 0) {
        return (time_t)-1;
    }
    time_t now = ts.tv_sec + offset;
    if (out) {
        *out = now;
    }
    return now;
}
