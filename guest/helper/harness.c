/* The check harness (see harness.h). */
#define _GNU_SOURCE
#include "harness.h"
#include "report.h"

#include <fnmatch.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_FIXTURES 8
#define MAX_CHECKS 128

/* Shared with the forked child: whether the running check has reported. */
struct harness_state {
    char running[96];
    int reported;
};

static struct harness_state *state;

static void check_reported(const char *name)
{
    if (state && !strcmp(name, state->running))
        state->reported = 1;
}

static int set_up(const struct fixture *f, const struct fixture **done, int *ndone, int *failed)
{
    if (!f)
        return 0;
    for (int i = 0; i < *ndone; i++)
        if (done[i] == f)
            return failed[i];
    int rc = set_up(f->needs, done, ndone, failed);
    if (rc == 0)
        rc = f->setup ? f->setup() : 0;
    if (*ndone < MAX_FIXTURES) {
        done[*ndone] = f;
        failed[(*ndone)++] = rc;
    }
    return rc;
}

static void enter(const struct fixture *f)
{
    if (!f)
        return;
    enter(f->needs);
    if (f->enter)
        f->enter();
}

/* The fault $aperture_fault injects into this check ("segv", "hang"), or NULL. The value is a comma-separated
 * list of CHECK:FAULT. */
static const char *fault_for(const struct check *c, char *buf, size_t len)
{
    const char *faults = getenv(APERTURE_ENV_FAULT);
    size_t n = strlen(c->name);

    for (const char *p = faults; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        if (strncmp(p, c->name, n) || p[n] != ':')
            continue;
        snprintf(buf, len, "%.*s", (int)strcspn(p + n + 1, ","), p + n + 1);
        return buf;
    }
    return NULL;
}

static void inject_fault(const char *fault)
{
    if (fault && !strcmp(fault, "segv"))
        raise(SIGSEGV);
    if (fault && !strcmp(fault, "hang"))
        for (;;)
            pause();
}

static void fail(const struct check *c, const char *why, const char *detail_json)
{
    if (state->reported) { /* it said what it found, then died: keep its verdict, say what happened */
        report_log("%s: %s after reporting", c->name, why);
        return;
    }
    report_check(c->name, 0, detail_json);
}

/* Fork, run, wait with a time limit. Returns 0 if the check passed or did not apply. */
static int run_check(const struct check *c)
{
    unsigned timeout_s = c->timeout_s ? c->timeout_s : HARNESS_TIMEOUT_S;
    if (c->plus_duration)
        timeout_s += (unsigned)atoi(env_or(APERTURE_ENV_DURATION, "0"));
    char fault_buf[16];
    const char *fault = fault_for(c, fault_buf, sizeof(fault_buf));
    if (fault && !strcmp(fault, "hang"))
        timeout_s = HARNESS_INJECTED_HANG_S;
    char detail[256];
    snprintf(state->running, sizeof(state->running), "%s", c->name);
    state->reported = 0;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(detail, sizeof(detail), "{\"harness\":\"fork failed\"}");
        fail(c, "fork failed", detail);
        return 1;
    }
    if (pid == 0) {
        enter(c->fixture);
        inject_fault(fault);
        c->fn();
        fflush(NULL);
        _exit(0);
    }
    double deadline = now_s() + timeout_s;
    int status = 0;
    for (;;) {
        pid_t got = waitpid(pid, &status, WNOHANG);
        if (got == pid)
            break;
        if (got < 0) {
            status = 0;
            break;
        }
        if (now_s() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            snprintf(detail, sizeof(detail), "{\"harness\":\"timeout\",\"timeout_s\":%u}", timeout_s);
            fail(c, "timed out", detail);
            return 1;
        }
        usleep(2000);
    }
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(detail, sizeof(detail), "{\"harness\":\"crashed\",\"signal\":\"SIG%s\",\"signal_number\":%d}",
                 sigabbrev_np(sig) ? sigabbrev_np(sig) : "?", sig);
        fail(c, "crashed", detail);
        return 1;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        snprintf(detail, sizeof(detail), "{\"harness\":\"exited\",\"status\":%d}", WEXITSTATUS(status));
        fail(c, "exited with an error", detail);
        return 1;
    }
    return 0;
}

/* Whether `name` matches one of the comma-separated globs in `list` (the host bounds the list's length). */
static int listed(const char *list, const char *name)
{
    char buf[1024], *save = NULL;

    if (!list || !*list)
        return 0;
    snprintf(buf, sizeof(buf), "%s", list);
    for (char *glob = strtok_r(buf, ",", &save); glob; glob = strtok_r(NULL, ",", &save))
        if (fnmatch(glob, name, 0) == 0)
            return 1;
    return 0;
}

/* --only / --skip (aperture_only, aperture_skip): a check that is not selected does not run, and a fixture that
 * no selected check needs is never set up. */
static int selected(const struct check *c)
{
    const char *only = getenv(APERTURE_ENV_ONLY);

    if (only && *only && !listed(only, c->name))
        return 0;
    return !listed(getenv(APERTURE_ENV_SKIP), c->name);
}

/* Every check registered with TEST (the linker collects the section's rows between these two symbols). */
extern const struct check *const __start_aperture_checks[];
extern const struct check *const __stop_aperture_checks[];

static int by_order(const void *a, const void *b)
{
    const struct check *x = *(const struct check *const *)a, *y = *(const struct check *const *)b;

    if (x->order != y->order)
        return x->order < y->order ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The checks scenario `s` runs, selected (--only/--skip) and in order; returns how many. */
static size_t scenario_checks(const struct scenario *s, const struct check **out)
{
    size_t n = 0;

    for (const struct check *const *c = __start_aperture_checks; c < __stop_aperture_checks && n < MAX_CHECKS; c++)
        if (((*c)->tags & s->tag) && selected(*c))
            out[n++] = *c;
    qsort(out, n, sizeof(out[0]), by_order);
    return n;
}

void harness_list(const struct scenario *s)
{
    const struct check *rows[MAX_CHECKS];
    size_t n = scenario_checks(s, rows);

    for (size_t i = 0; i < n; i++)
        printf("%s\n", rows[i]->name);
}

int harness_run(const struct scenario *s)
{
    const struct check *rows[MAX_CHECKS];
    size_t nrows = scenario_checks(s, rows);
    const struct fixture *done[MAX_FIXTURES];
    int failed[MAX_FIXTURES], ndone = 0, rc = 0;

    if (!state) {
        void *m = mmap(NULL, sizeof(*state), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            report_log("harness: no shared memory for the check state");
            return 1;
        }
        state = m;
        report_on_check(check_reported);
    }
    for (size_t i = 0; i < nrows; i++) {
        const struct check *c = rows[i];

        if (set_up(c->fixture, done, &ndone, failed) != 0)
            continue;
        rc |= run_check(c);
    }
    state->running[0] = 0;
    if ((s->run || s->serve_after) && set_up(s->fixture, done, &ndone, failed) == 0 && s->run)
        s->run();
    for (int i = ndone - 1; i >= 0; i--)
        if (done[i]->teardown && failed[i] == 0)
            done[i]->teardown();
    return rc;
}
