/* serve: after `idle`, run commands the host sends on the aperture.cmd port (one JSON object per line):
 *   {"id": N, "exec": "shell command"}   → {"type":"cmd-output","id":N,"data":"..."} per 2 KiB of output, then
 *                                          {"type":"cmd-done","id":N,"rc":RC,"output_bytes":N,"truncated":false}
 *   {"id": N, "scenario": NAME} → the scenario's checks (scenarios.c: those marked serve), then cmd-done
 * This is how the pytest plugin runs things in an already booted guest.
 */
#define _GNU_SOURCE
#include "harness.h"
#include "report.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
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

/* Output goes out in cmd-output chunks small enough that each escaped line fits a jbuf (a byte escapes to at most
 * 6 characters), so any output arrives whole; past EXEC_OUTPUT_MAX it is drained and dropped ("truncated"). */
#define EXEC_CHUNK 2048
#define EXEC_OUTPUT_MAX (1 << 20)

static void run_exec(long id, const char *cmd)
{
    static char chunk[EXEC_CHUNK + 1];
    static struct jbuf jb;
    char full[4200];
    snprintf(full, sizeof(full), "%s 2>&1", cmd);
    FILE *f = popen(full, "r");
    int rc = -1;
    size_t total = 0;
    if (f) {
        size_t got;
        while ((got = fread(chunk, 1, EXEC_CHUNK, f)) > 0) {
            total += got;
            if (total - got >= EXEC_OUTPUT_MAX)
                continue;
            chunk[got] = 0;
            if (memchr(chunk, 0, got)) /* jb_str stops at a NUL: show NULs as '?' */
                for (size_t i = 0; i < got; i++)
                    if (!chunk[i])
                        chunk[i] = '?';
            jb_init(&jb);
            jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_CMD_OUTPUT "\",\"id\":%ld,\"data\":", id);
            jb_str(&jb, chunk);
            jb_printf(&jb, "}");
            report_line(jb.buf);
        }
        int st = pclose(f);
        rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    }
    jb_init(&jb);
    jb_printf(&jb, "{\"type\":\"" APERTURE_MSG_CMD_DONE "\",\"id\":%ld,\"rc\":%d,\"output_bytes\":%zu,\"truncated\":%s}", id, rc,
              total, total > EXEC_OUTPUT_MAX ? "true" : "false");
    report_line(jb.buf);
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
            char arg[4096];
            long id = json_int(buf, "id");
            if (json_string(buf, "exec", arg, sizeof(arg)) == 0)
                run_exec(id, arg);
            else if (json_string(buf, "scenario", arg, sizeof(arg)) == 0)
                run_scenario(id, arg);
            else
                report_log("serve: unparseable command");
            len -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, len + 1);
        }
        if (len >= sizeof(buf) - 1)
            len = 0; /* a line longer than the buffer: drop it */
    }
}
