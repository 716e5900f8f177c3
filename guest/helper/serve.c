/* serve: after `idle`, run commands the host sends on the aperture.cmd port (one JSON object per line):
 *   {"id": N, "exec": "shell command", "cwd": DIR?} → {"type":"cmd-output","id":N,"stream":"stdout"|"stderr",
 *                                          "data":"..."} as the command writes (≤ 2 KiB each), then
 *                                          {"type":"cmd-done","id":N,"rc":RC,"output_bytes":N,"truncated":false}
 *   {"id": N, "scenario": NAME} → the scenario's checks (scenarios.c: those marked serve), then cmd-done
 *   {"id": N, "env": "k=v k=v"}  → setenv each (what differs per run reaches a restored guest this way)
 *   {"id": N, "clock": SECONDS, "clock_ns": NS} → the guest's clock set (right after a restore)
 * This is how the pytest plugin runs things in an already booted guest.
 */
#define _GNU_SOURCE
#include "harness.h"
#include "report.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Extract the string value of "key" from a flat JSON object (handles \" \\ \n \t escapes). */
static int json_string(const char *obj, const char *key, char *out, size_t outlen)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    const char *p = strstr(obj, pat);
    if (!p)
        return -1;
    p = strchr(p + strlen(pat), ':');
    if (!p)
        return -1;
    while (*++p == ' ')
        ;
    if (*p != '"')
        return -1;
    size_t n = 0;
    for (p++; *p && *p != '"' && n + 1 < outlen; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            out[n++] = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
        } else {
            out[n++] = *p;
        }
    }
    out[n] = 0;
    return *p == '"' ? 0 : -1;
}

static long json_int(const char *obj, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    const char *p = strstr(obj, pat);
    if (!p || !(p = strchr(p + strlen(pat), ':')))
        return -1;
    return strtol(p + 1, NULL, 10);
}

/* Output goes out in cmd-output chunks as soon as the command writes it (a read of the pipe returns what is
 * there), each small enough that its escaped line fits a jbuf (a byte escapes to at most 6 characters), with the
 * stream it came from; past EXEC_OUTPUT_MAX it is drained and dropped ("truncated"). */
#define EXEC_CHUNK 2048
#define EXEC_OUTPUT_MAX (1 << 20)  /* unless the request asks for another limit ("max_output", at most 32 MiB) */
#define EXEC_OUTPUT_LIMIT (32 << 20)

static void send_chunk(long id, const char *stream, char *data, size_t got)
{
    static struct jbuf jb;
    data[got] = 0;
    if (memchr(data, 0, got)) /* jb_str stops at a NUL: show NULs as '?' */
        for (size_t i = 0; i < got; i++)
            if (!data[i])
                data[i] = '?';
    jb_init(&jb);
    jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_CMD_OUTPUT "\",\"id\":%ld,\"stream\":\"%s\",\"data\":", id, stream);
    jb_str(&jb, data);
    jb_printf(&jb, "}");
    report_line(jb.buf);
}

/* sh -c CMD in DIR (if given), stdout and stderr on their own pipes, both relayed as they come. The exit status
 * as a shell gives it: 128 + N for a command killed by signal N. */
static void run_exec(long id, const char *cmd, const char *dir, size_t limit)
{
    static char chunk[EXEC_CHUNK + 1];
    char line[256];
    int out[2], err[2], rc = -1;
    size_t total = 0;

    if (pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            dup2(out[1], 1);
            dup2(err[1], 2);
            setpgid(0, 0);
            if (dir && *dir && chdir(dir) != 0) {
                dprintf(2, "aperture: cannot enter %s\n", dir);
                _exit(127);
            }
            execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
            _exit(127);
        }
        close(out[1]);
        close(err[1]);
        struct pollfd fds[2] = {{.fd = out[0], .events = POLLIN}, {.fd = err[0], .events = POLLIN}};
        const char *names[2] = {"stdout", "stderr"};
        int open_fds = 2;
        while (pid > 0 && open_fds > 0) {
            if (poll(fds, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
            for (int i = 0; i < 2; i++) {
                if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                    continue;
                ssize_t got = read(fds[i].fd, chunk, EXEC_CHUNK);
                if (got <= 0) {
                    close(fds[i].fd);
                    fds[i].fd = -1;
                    open_fds--;
                    continue;
                }
                total += (size_t)got;
                if (total - (size_t)got < limit)
                    send_chunk(id, names[i], chunk, (size_t)got);
            }
        }
        int st = 0;
        if (pid > 0 && waitpid(pid, &st, 0) == pid)
            rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    }
    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_CMD_DONE "\",\"id\":%ld,\"rc\":%d,\"output_bytes\":%zu,"
             "\"truncated\":%s}", id, rc, total, total > limit ? "true" : "false");
    report_line(line);
}

static void run_scenario(long id, const char *name)
{
    const struct scenario *s = scenario_find(name);
    int known = s && s->serve;
    char line[160];

    if (known)
        harness_run(s);
    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_CMD_DONE "\",\"id\":%ld,\"rc\":%d,\"output\":\"%s\"}", id,
             known ? 0 : 2, known ? "" : "unknown scenario");
    report_line(line);
}

static void done(long id, int rc, const char *why)
{
    char line[256];

    snprintf(line, sizeof(line), "{\"type\":\"" APERTURE_MSG_CMD_DONE "\",\"id\":%ld,\"rc\":%d,\"output\":\"%s\"}", id,
             rc, why);
    report_line(line);
}

/* "k=v k=v": only aperture_* variables (the helper's own configuration), nothing of the process's own. */
static void set_env(long id, char *list)
{
    int bad = 0;

    for (char *tok = strtok(list, " "); tok; tok = strtok(NULL, " ")) {
        char *eq = strchr(tok, '=');
        if (!eq || strncmp(tok, "aperture_", 9)) {
            bad++;
            continue;
        }
        *eq = 0;
        setenv(tok, eq + 1, 1);
    }
    done(id, bad ? 2 : 0, bad ? "only aperture_*=value pairs" : "");
}

static void set_clock(long id, long seconds, long ns)
{
    struct timespec ts = {.tv_sec = seconds, .tv_nsec = ns >= 0 && ns < 1000000000 ? ns : 0};
    int rc = seconds > 0 && clock_settime(CLOCK_REALTIME, &ts) == 0 ? 0 : 1;

    /* The console (our stderr) of a restored VM starts here: say so. */
    fprintf(stderr, "aperture: restored from a warm-start snapshot; clock set%s\n", rc ? " FAILED" : "");
    done(id, rc, "");
}

void scenario_serve(void)
{
    int fd = open_port(APERTURE_COMMAND_PORT, O_RDONLY);
    if (fd < 0)
        for (;;)
            pause();
    static char buf[8192];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof(buf) - 1 - len);
        if (n <= 0) {
            usleep(50000); /* host not connected (yet): the port reads EOF */
            continue;
        }
        len += (size_t)n;
        buf[len] = 0;
        char *nl;
        while ((nl = strchr(buf, '\n'))) {
            *nl = 0;
            char arg[4096], dir[1024];
            long id = json_int(buf, "id");
            long max_output = json_int(buf, "max_output");
            size_t limit = max_output > 0 && max_output <= EXEC_OUTPUT_LIMIT ? (size_t)max_output : EXEC_OUTPUT_MAX;
            if (json_string(buf, "exec", arg, sizeof(arg)) == 0)
                run_exec(id, arg, json_string(buf, "cwd", dir, sizeof(dir)) == 0 ? dir : NULL, limit);
            else if (json_string(buf, "scenario", arg, sizeof(arg)) == 0)
                run_scenario(id, arg);
            else if (json_string(buf, "env", arg, sizeof(arg)) == 0)
                set_env(id, arg);
            else if (json_int(buf, "clock") > 0)
                set_clock(id, json_int(buf, "clock"), json_int(buf, "clock_ns"));
            else
                report_log("serve: unparseable command");
            len -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, len + 1);
        }
        if (len >= sizeof(buf) - 1)
            len = 0; /* a line longer than the buffer: drop it */
    }
}
