/* The helper's test harness, after the kernel's kselftest harness (tools/testing/selftests/kselftest_harness.h):
 * checks are rows of a table, {name, fixture, fn, timeout}; fixtures set up shared state once, in the parent;
 * each check runs in its own forked child with a time limit, so a check that crashes or hangs is reported as
 * that check failing (the signal or the timeout named in its detail) and the checks after it still run.
 *
 * A check's fn reports its result with report_check(its name, ...). Returning without reporting means "does not
 * apply here" (it should say why with report_log); only a crash, a timeout or a non-zero exit is a failure the
 * harness reports on the check's behalf. */
#ifndef APERTURE_HARNESS_H
#define APERTURE_HARNESS_H

struct fixture {
    const char *name;
    const struct fixture *needs; /* set up first (e.g. the devices need DAX configured) */
    int (*setup)(void);          /* in the parent; 0: its checks run, non-zero: they are skipped */
    void (*enter)(void);         /* in each check's child before fn (e.g. resynchronise ring indices); or NULL */
    void (*teardown)(void);      /* after the scenario's last check; or NULL */
};

struct check {
    const char *name; /* the APERTURE_CHECK_* it reports */
    const struct fixture *fixture;
    void (*fn)(void);
    unsigned timeout_s; /* 0: HARNESS_TIMEOUT_S */
    int plus_duration;  /* the time limit grows by $aperture_duration (workloads that run that long) */
};

#define HARNESS_TIMEOUT_S 120

/* A scenario: the checks it runs, in order, or a function for what is not a list of checks (benchmarks, the
 * serve loop). `serve`: the host may ask for it over the command port of a running VM. */
struct scenario {
    const char *name;
    const struct check *const *checks; /* NULL-terminated, or NULL */
    const struct fixture *fixture;     /* for run: set up before it, torn down after */
    void (*run)(void);                 /* after the checks, or NULL */
    int serve;                         /* the host may run it over the command port */
    int serve_after;                   /* then say "idle" and serve the host's commands (main.c) */
};

/* Run a scenario: its checks (each fixture set up when first needed), then its run function; fixtures are torn
 * down at the end. Returns non-zero when the harness had to fail a check (crash, timeout, exit). */
int harness_run(const struct scenario *s);
const struct scenario *scenario_find(const char *name);

/* Fault injection, for the harness's own tests: $aperture_fault = CHECK:segv[,CHECK:hang...]. segv makes the
 * check's child die of SIGSEGV before it reports; hang makes it hang (its time limit is then 5 s). */
#define HARNESS_INJECTED_HANG_S 5

#endif
