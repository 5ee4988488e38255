/* Test helper, preloaded (LD_PRELOAD) into the pipeline's processes by tests/freeze.py: the first
 * process that opens a path containing the pattern in $FREEZE_CONTROL (line 1) for the Nth time (line 2,
 * default 1) writes its pid beside that file and stops itself (SIGSTOP) before the open, so a test can
 * kill or signal it at exactly that point: fault injection at a file event, with no hook in the code
 * under test. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char pattern[4096];
static int armed = -1; /* -1: control file not read yet in this process */
static long opens_left = 1; /* matching opens until the one that freezes, this one included */

static void read_control(void) {
    armed = 0;
    const char *control = getenv("FREEZE_CONTROL");
    if (!control) return;
    FILE *(*real_fopen)(const char *, const char *) = dlsym(RTLD_NEXT, "fopen");
    FILE *f = real_fopen(control, "r");
    if (!f) return;
    if (fgets(pattern, sizeof pattern, f)) {
        pattern[strcspn(pattern, "\n")] = 0;
        armed = pattern[0] != 0;
        char count[64];
        if (fgets(count, sizeof count, f) && atol(count) > 0) opens_left = atol(count);
    }
    fclose(f);
}

static void maybe_freeze(const char *path) {
    if (armed < 0) read_control();
    if (!armed || !path || !strstr(path, pattern)) return;
    if (--opens_left > 0) return;
    armed = 0;
    char pidfile[4200];
    snprintf(pidfile, sizeof pidfile, "%s.pid", getenv("FREEZE_CONTROL"));
    FILE *(*real_fopen)(const char *, const char *) = dlsym(RTLD_NEXT, "fopen");
    FILE *f = real_fopen(pidfile, "w");
    if (f) {
        fprintf(f, "%d\n", getpid());
        fclose(f);
    }
    raise(SIGSTOP);
}

#define MODE_ARG(flags) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, int); va_end(ap); }

#define WRAP_OPEN(name) \
    int name(const char *path, int flags, ...) { \
        MODE_ARG(flags) \
        maybe_freeze(path); \
        int (*real)(const char *, int, ...) = dlsym(RTLD_NEXT, #name); \
        return real(path, flags, mode); \
    }

#define WRAP_OPENAT(name) \
    int name(int dirfd, const char *path, int flags, ...) { \
        MODE_ARG(flags) \
        maybe_freeze(path); \
        int (*real)(int, const char *, int, ...) = dlsym(RTLD_NEXT, #name); \
        return real(dirfd, path, flags, mode); \
    }

#define WRAP_FOPEN(name) \
    FILE *name(const char *path, const char *how) { \
        maybe_freeze(path); \
        FILE *(*real)(const char *, const char *) = dlsym(RTLD_NEXT, #name); \
        return real(path, how); \
    }

WRAP_OPEN(open)
WRAP_OPEN(open64)
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)
WRAP_FOPEN(fopen)
WRAP_FOPEN(fopen64)
