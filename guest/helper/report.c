#include "report.h"
#include "harness.h"
#include "aperture_abi.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static int results_fd = -1;

void jb_init(struct jbuf *jb) { jb->len = 0; jb->buf[0] = 0; }

void jb_printf(struct jbuf *jb, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(jb->buf + jb->len, sizeof(jb->buf) - jb->len, fmt, ap);
    va_end(ap);
    if (n > 0) {
        jb->len += (size_t)n;
        if (jb->len >= sizeof(jb->buf))
            jb->len = sizeof(jb->buf) - 1;
    }
}

void jb_str(struct jbuf *jb, const char *s)
{
    jb_printf(jb, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            jb_printf(jb, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            jb_printf(jb, "\\u%04x", c);
        else
            jb_printf(jb, "%c", c);
    }
    jb_printf(jb, "\"");
}

/* Open /dev/vportNpM whose /sys/class/virtio-ports/.../name is `name` (waits up to 2 s). */
int open_port(const char *name, int flags)
{
    int fd = -1;
    for (int tries = 0; tries < 200 && fd < 0; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d)) && fd < 0) {
            char path[512], pname[128];
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
            if (read_text(path, pname, sizeof(pname)) == 0 && strcmp(pname, name) == 0) {
                snprintf(path, sizeof(path), "/dev/%s", e->d_name);
                fd = open(path, flags | O_CLOEXEC);
            }
        }
        if (d)
            closedir(d);
        if (fd < 0)
            usleep(10000);
    }
    return fd;
}

void report_open(void)
{
    results_fd = open_port(APERTURE_RESULTS_PORT, O_WRONLY);
    if (results_fd < 0)
        fprintf(stderr, "aperture-helper: results port not found; reporting on stdout\n");
}

int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Bytes as they are, no newline added: the fuzzer's garbage on the results channel. */
void report_raw(const void *buf, size_t len)
{
    write_all(results_fd >= 0 ? results_fd : 1, buf, len);
}

void report_line(const char *json)
{
    int fd = results_fd >= 0 ? results_fd : 1;
    size_t len = strlen(json);
    char *line = malloc(len + 2);
    if (!line)
        return;
    memcpy(line, json, len);
    line[len] = '\n';
    write_all(fd, line, len + 1); /* one write where the port takes it: lines never interleave */
    free(line);
}

static double uptime_s(void)
{
    char buf[64];
    if (read_text("/proc/uptime", buf, sizeof(buf)) != 0)
        return -1;
    return atof(buf);
}

void report_hello(void)
{
    struct utsname u;
    struct jbuf jb;
    uname(&u);
    jb_init(&jb);
    jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_HELLO "\",\"kernel_release\":");
    jb_str(&jb, u.release);
    jb_printf(&jb, ",\"uptime_s\":%.3f,\"helper_abi\":%d}", uptime_s(), APERTURE_HELPER_ABI);
    report_line(jb.buf);
}

static void (*check_hook)(const char *name);

void report_on_check(void (*hook)(const char *name))
{
    check_hook = hook;
}

/* The running check's expectations (harness.h EXPECT_*): how many failed, and the first one. Each check runs in
 * a process of its own, and reporting it resets them. */
static struct {
    int failures;
    char expr[200];
    long long got, want;
    int line;
} expectations;

void expect_cmp(const char *expr, long long got, long long want, int holds, int line)
{
    if (holds)
        return;
    if (expectations.failures++ == 0) {
        snprintf(expectations.expr, sizeof(expectations.expr), "%s", expr);
        expectations.got = got;
        expectations.want = want;
        expectations.line = line;
    }
}

int expect_failures(void)
{
    return expectations.failures;
}

void report_check(const char *name, int ok, const char *detail_json)
{
    struct jbuf jb;
    const char *detail = detail_json ? detail_json : "null";

    jb_init(&jb);
    jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_CHECK "\",\"name\":");
    jb_str(&jb, name);
    jb_printf(&jb, ",\"ok\":%s,\"detail\":", ok && !expectations.failures ? "true" : "false");
    if (expectations.failures && detail[0] == '{') {
        /* The first failed expectation goes first in the detail object. */
        jb_printf(&jb, "{\"failed\":{\"expr\":");
        jb_str(&jb, expectations.expr);
        jb_printf(&jb, ",\"got\":%lld,\"want\":%lld,\"line\":%d,\"count\":%d}%s%s", expectations.got,
                  expectations.want, expectations.line, expectations.failures, strcmp(detail, "{}") ? "," : "",
                  detail + 1);
    } else {
        jb_printf(&jb, "%s", detail);
    }
    jb_printf(&jb, "}");
    memset(&expectations, 0, sizeof(expectations));
    report_line(jb.buf);
    if (check_hook)
        check_hook(name);
}

void report_skip(const char *name, const char *reason)
{
    struct jbuf jb;

    jb_init(&jb);
    jb_printf(&jb, "{\"skip_reason\":");
    jb_str(&jb, reason);
    jb_printf(&jb, "}");
    report_check(name, 1, jb.buf);
}

void report_log(const char *fmt, ...)
{
    char msg[1024];
    struct jbuf jb;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    jb_init(&jb);
    jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_LOG "\",\"message\":");
    jb_str(&jb, msg);
    jb_printf(&jb, "}");
    report_line(jb.buf);
}

void report_done(void)
{
    char buf[64];
    snprintf(buf, sizeof(buf), "{\"type\":\"" APERTURE_MSG_DONE "\",\"uptime_s\":%.3f}", uptime_s());
    report_line(buf);
}

int read_text(const char *path, char *out, size_t outlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, out, outlen - 1);
    close(fd);
    if (n < 0)
        return -1;
    out[n] = 0;
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
        out[--n] = 0;
    return 0;
}

const char *env_or(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}
