/* witness.hmm_tests: the kernel's own HMM selftest (tools/testing/selftests/mm/hmm-tests, built static from
 * the guest kernel's tree) run against its test_hmm driver: an outside witness that device-private memory,
 * migration and hmm_range_fault work in this kernel. The guest counts the kselftest TAP results; the host
 * decides (0 failed, at least 20 passed) and explains each group of skipped tests. */
#define _GNU_SOURCE
#include "checks.h"
#include "report.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define HMM_TESTS "/usr/lib/aperture/hmm-tests"
#define TEST_HMM_KO "/lib/modules/test_hmm.ko" /* loaded here, not by /init: it costs boot time */
#define HMM_TIMEOUT_S 240.0
#define MAX_GROUPS 8
#define MAX_FAILED 16

struct skip_group {
    char reason[160];
    char example[96];
    int count;
};

struct tap_counts {
    int passed, failed, skipped;
    int nr_groups, nr_failed;
    struct skip_group groups[MAX_GROUPS];
    char failed_tests[MAX_FAILED][96];
};

/* One TAP line: "ok N name", "ok N name # SKIP reason", "not ok N name". */
static void tap_line(struct tap_counts *c, const char *line)
{
    const char *name, *skip;
    int failed = strncmp(line, "not ok ", 7) == 0;
    char test[96];

    if (!failed && strncmp(line, "ok ", 3) != 0)
        return;
    name = strchr(line + (failed ? 7 : 3), ' ');
    name = name ? name + 1 : "?";
    snprintf(test, sizeof(test), "%.*s", (int)strcspn(name, " #"), name);
    skip = strstr(line, "# SKIP");
    if (failed) {
        if (c->nr_failed < MAX_FAILED)
            snprintf(c->failed_tests[c->nr_failed++], sizeof(c->failed_tests[0]), "%s", test);
        c->failed++;
    } else if (skip) {
        const char *reason = skip + 6;
        int i;

        while (*reason == ' ')
            reason++;
        c->skipped++;
        for (i = 0; i < c->nr_groups; i++)
            if (strcmp(c->groups[i].reason, reason) == 0)
                break;
        if (i == c->nr_groups && i < MAX_GROUPS) {
            snprintf(c->groups[i].reason, sizeof(c->groups[i].reason), "%s", reason);
            snprintf(c->groups[i].example, sizeof(c->groups[i].example), "%s", test);
            c->nr_groups++;
        }
        if (i < MAX_GROUPS)
            c->groups[i].count++;
    } else {
        c->passed++;
    }
}

#define THP_ENABLED "/sys/kernel/mm/transparent_hugepage/enabled"

/* hugetlbfs pages and debugfs (gup_test) let two more groups of hmm-tests run instead of skipping. THP goes to
 * "madvise" for the run: the kernel turns THP off by default below 512 MiB of RAM and on above, and 6.12's
 * device-exclusive entries fail hmm-tests' exclusive* cases on THP-backed malloc buffers; with "madvise" the
 * THP cases (which madvise) still run and the result does not depend on the VM's memory size. */
static void prepare_environment(char *huge, size_t hugelen, int *debugfs, char *thp, size_t thplen)
{
    char *sel, *end;

    if (read_text(THP_ENABLED, thp, thplen) == 0 && (sel = strchr(thp, '[')) && (end = strchr(sel, ']'))) {
        memmove(thp, sel + 1, (size_t)(end - sel - 1));
        thp[end - sel - 1] = '\0';
    } else {
        snprintf(thp, thplen, "unknown");
    }
    write_text(THP_ENABLED, "madvise");
    write_text("/proc/sys/vm/nr_hugepages", "4");
    if (read_text("/proc/sys/vm/nr_hugepages", huge, hugelen) != 0)
        snprintf(huge, hugelen, "unknown");
    mkdir("/sys/kernel/debug", 0755);
    *debugfs = mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL) == 0 || errno == EBUSY;
}

static void check_hmm_tests(void)
{
    struct tap_counts c;
    struct jbuf jb;
    char huge[32], thp[128], buf[4096], line[512];
    size_t linelen = 0;
    int pipefd[2], debugfs = 0, status = 0, timed_out = 0;
    double t0;
    pid_t pid;

    memset(&c, 0, sizeof(c));
    jb_init(&jb);
    if (!path_exists("/dev/hmm_dmirror0") && path_exists(TEST_HMM_KO))
        run_cmd("insmod " TEST_HMM_KO);
    if (!path_exists(HMM_TESTS) || !path_exists("/dev/hmm_dmirror0")) {
        jb_printf(&jb, "{\"result\":\"absent\",\"why\":");
        jb_str(&jb, !path_exists(HMM_TESTS) ? "no hmm-tests in the image (the kernel was not built by "
                                              "`aperture kernel build`)"
                                            : "no /dev/hmm_dmirror0: kernel without CONFIG_TEST_HMM");
        jb_printf(&jb, "}");
        report_check(APERTURE_CHECK_WITNESS_HMM_TESTS, 0, jb.buf);
        return;
    }
    prepare_environment(huge, sizeof(huge), &debugfs, thp, sizeof(thp));
    if (pipe(pipefd) != 0)
        return;
    t0 = now_s();
    pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        close(pipefd[1]);
        execl(HMM_TESTS, HMM_TESTS, (char *)NULL);
        _exit(127);
    }
    close(pipefd[1]);
    for (;;) {
        struct pollfd pfd = { .fd = pipefd[0], .events = POLLIN };
        double left = HMM_TIMEOUT_S - (now_s() - t0);
        ssize_t n;

        if (pid < 0)
            break;
        if (left <= 0) {
            timed_out = 1;
            kill(pid, SIGKILL);
            break;
        }
        if (poll(&pfd, 1, (int)(left * 1000) + 1) <= 0)
            continue;
        n = read(pipefd[0], buf, sizeof(buf));
        if (n <= 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n' || linelen == sizeof(line) - 1) {
                line[linelen] = '\0';
                tap_line(&c, line);
                linelen = 0;
            } else {
                line[linelen++] = buf[i];
            }
        }
    }
    close(pipefd[0]);
    if (pid > 0)
        waitpid(pid, &status, 0);
    if (strcmp(thp, "unknown") != 0)
        write_text(THP_ENABLED, thp); /* as it was */

    jb_printf(&jb, "{\"result\":\"ran\",\"binary\":\"" HMM_TESTS "\",\"passed\":%d,\"failed\":%d,\"skipped\":%d,"
              "\"timed_out\":%s,\"exit_status\":%d,\"signal\":%d,\"duration_s\":%.2f,\"nr_hugepages\":",
              c.passed, c.failed, c.skipped, timed_out ? "true" : "false",
              WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0,
              now_s() - t0);
    jb_str(&jb, huge);
    jb_printf(&jb, ",\"thp_during_run\":\"madvise\",\"thp_before\":");
    jb_str(&jb, thp);
    jb_printf(&jb, ",\"debugfs\":%s,\"skipped_groups\":[", debugfs ? "true" : "false");
    for (int i = 0; i < c.nr_groups; i++) {
        jb_printf(&jb, "%s{\"reason\":", i ? "," : "");
        jb_str(&jb, c.groups[i].reason);
        jb_printf(&jb, ",\"count\":%d,\"example\":", c.groups[i].count);
        jb_str(&jb, c.groups[i].example);
        jb_printf(&jb, "}");
    }
    jb_printf(&jb, "],\"failed_tests\":[");
    for (int i = 0; i < c.nr_failed; i++) {
        jb_printf(&jb, "%s", i ? "," : "");
        jb_str(&jb, c.failed_tests[i]);
    }
    jb_printf(&jb, "]}");
    report_check(APERTURE_CHECK_WITNESS_HMM_TESTS, !timed_out && c.failed == 0 && c.passed >= 20, jb.buf);
}

/* hmm-tests has its own time limit (HMM_TIMEOUT_S); the harness's is above it. */
TEST(check_witness_hmm_tests, .name = APERTURE_CHECK_WITNESS_HMM_TESTS, .fn = check_hmm_tests, .timeout_s = 300,
     .order = 400, .tags = TAG_DEFAULT);
