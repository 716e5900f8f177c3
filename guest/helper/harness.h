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

/* Scenario tags: the scenarios (scenarios.c) that run a check; a check carries every tag it belongs to. */
enum {
    TAG_DEFAULT = 1 << 0,  /* aperture run: everything below that applies to one VM */
    TAG_NVDIMM = 1 << 1,   /* the VM's setup (idle, nvdimm) */
    TAG_DAX = 1 << 2,
    TAG_APERTURE = 1 << 3, /* the helper's own device checks */
    TAG_DRIVER = 1 << 4,   /* the guest kernel driver's */
    TAG_REMAP = 1 << 5,    /* aperture run --remap-every */
    TAG_FUZZ = 1 << 6,     /* aperture run --fuzz */
};

struct check {
    const char *name; /* the APERTURE_CHECK_* it reports */
    const struct fixture *fixture;
    void (*fn)(void);
    unsigned timeout_s; /* 0: HARNESS_TIMEOUT_S */
    int plus_duration;  /* the time limit grows by $aperture_duration (workloads that run that long) */
    unsigned tags;      /* TAG_*: the scenarios that run it */
    unsigned order;     /* checks run in ascending order (a check may read what an earlier one left) */
};

/*
 * A check registers itself, as kselftest's TEST_F does: its row goes into the `aperture_checks` section, and a
 * scenario runs every registered check that carries its tag, in `order`. Adding a check is this line in the
 * check's own file (plus its name in abi.py and its row in the host's check table).
 *   TEST(check_hmm_migrate, .name = APERTURE_CHECK_HMM_MIGRATE, .fn = check_migrate, .fixture = &fixture_kdev,
 *        .tags = TAG_DEFAULT | TAG_DRIVER, .order = 520, .timeout_s = 120);
 */
#define TEST(id, ...)                                                                                          \
    static const struct check id = {__VA_ARGS__};                                                               \
    static const struct check *const id##_row __attribute__((used, section("aperture_checks"))) = &id

/*
 * Expectations inside a check (kselftest's EXPECT_*): each failing one is counted, and the first is kept —
 * its expression and both values — so the check's detail says which condition failed ("failed": {"expr",
 * "got", "want", "line"}); report_check() fails a check that had one, whatever `ok` it is given.
 */
void expect_cmp(const char *expr, long long got, long long want, int holds, int line);
#define EXPECT_OP(got, op, want)                                                                               \
    expect_cmp(#got " " #op " " #want, (long long)(got), (long long)(want), (got) op (want), __LINE__)
#define EXPECT_EQ(got, want) EXPECT_OP(got, ==, want)
#define EXPECT_NE(got, want) EXPECT_OP(got, !=, want)
#define EXPECT_LE(got, want) EXPECT_OP(got, <=, want)
#define EXPECT_GE(got, want) EXPECT_OP(got, >=, want)
#define EXPECT_GT(got, want) EXPECT_OP(got, >, want)
#define EXPECT_TRUE(cond) expect_cmp(#cond, !!(cond), 1, !!(cond), __LINE__)
/* The expectations that failed so far in this check (0: none). */
int expect_failures(void);

/* kselftest's SKIP: the check cannot apply here; the host reports it as "skip" with this reason. */
void report_skip(const char *name, const char *reason);

#define HARNESS_TIMEOUT_S 120

/* A scenario: the checks it runs, in order, or a function for what is not a list of checks (benchmarks, the
 * serve loop). `serve`: the host may ask for it over the command port of a running VM. */
struct scenario {
    const char *name;
    unsigned tag;                      /* the registered checks it runs (TAG_*), or 0 */
    const struct fixture *fixture;     /* for run: set up before it, torn down after */
    void (*run)(void);                 /* after the checks, or NULL */
    int serve;                         /* the host may run it over the command port */
    int serve_after;                   /* then say "idle" and serve the host's commands (main.c) */
};

/* Run a scenario: its checks (each fixture set up when first needed), then its run function; fixtures are torn
 * down at the end. Returns non-zero when the harness had to fail a check (crash, timeout, exit). */
int harness_run(const struct scenario *s);
void harness_list(const struct scenario *s); /* `aperture-helper list SCENARIO`: the checks it would run, in order */
const struct scenario *scenario_find(const char *name);

/* Fault injection, for the harness's own tests: $aperture_fault = CHECK:segv[,CHECK:hang...]. segv makes the
 * check's child die of SIGSEGV before it reports; hang makes it hang (its time limit is then 5 s). */
#define HARNESS_INJECTED_HANG_S 5

#endif
