/* The interactive shell behind `aperture shell NAME` / `aperture run --shell`: a relay between the shell port
 * (frames of [kind u8][length u16 LE][payload], see APERTURE_SHELL_* and guest/abi.py) and a pseudo-terminal
 * whose slave is the controlling terminal of `sh -i` in a session of its own, so job control works and a
 * Ctrl-C typed on the host reaches the guest's foreground job through the line discipline. One session at a
 * time; a hangup (the user detached) or the shell's exit ends it, and the relay waits for the next OPEN.
 */
#define _GNU_SOURCE
#include "report.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define FRAME_MAX 4096

struct session {
    int master;
    pid_t pid;
};

static void send_frame(int port, char kind, const void *payload, size_t len)
{
    unsigned char head[3] = {(unsigned char)kind, (unsigned char)(len & 0xff), (unsigned char)(len >> 8)};
    write_all(port, head, sizeof(head));
    if (len)
        write_all(port, payload, len);
}

static void set_winsize(int master, const unsigned char *p, size_t len)
{
    if (len < 4)
        return;
    struct winsize ws = {.ws_row = (unsigned short)(p[0] | p[1] << 8), .ws_col = (unsigned short)(p[2] | p[3] << 8)};
    ioctl(master, TIOCSWINSZ, &ws);
}

static int start_session(struct session *s, const unsigned char *size, size_t len)
{
    s->master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (s->master < 0 || grantpt(s->master) || unlockpt(s->master))
        return -1;
    set_winsize(s->master, size, len);
    const char *slave = ptsname(s->master);
    s->pid = fork();
    if (s->pid == 0) {
        setsid();
        int fd = open(slave, O_RDWR);
        if (fd < 0)
            _exit(127);
        ioctl(fd, TIOCSCTTY, 0);
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2)
            close(fd);
        setenv("TERM", "xterm", 0);
        setenv("HOME", "/root", 1); /* not "/": busybox 1.37 would show the root directory as ~ */
        setenv("PS1", "[aperture \\w]# ", 1);
        execl("/bin/sh", "sh", "-i", (char *)NULL);
        _exit(127);
    }
    return s->pid > 0 ? 0 : -1;
}

static void end_session(int port, struct session *s, int hangup)
{
    int st = 0, rc;
    if (hangup && s->pid > 0)
        kill(-s->pid, SIGHUP);
    close(s->master);
    s->master = -1;
    if (s->pid > 0 && waitpid(s->pid, &st, 0) == s->pid)
        rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    else
        rc = -1;
    s->pid = -1;
    if (!hangup) {
        unsigned char payload[4] = {(unsigned char)rc, (unsigned char)(rc >> 8), (unsigned char)(rc >> 16),
                                    (unsigned char)(rc >> 24)};
        send_frame(port, APERTURE_SHELL_EXIT, payload, sizeof(payload));
    }
}

/* Parse whole frames out of buf; returns the bytes consumed. */
static size_t take_frames(int port, struct session *s, unsigned char *buf, size_t len)
{
    size_t off = 0;
    while (len - off >= 3) {
        size_t n = buf[off + 1] | (size_t)buf[off + 2] << 8;
        if (len - off < 3 + n)
            break;
        unsigned char kind = buf[off], *payload = buf + off + 3;
        if (kind == APERTURE_SHELL_OPEN) {
            /* The host's end takes one client at a time: an OPEN means the previous client is gone (killed
             * before its hangup reached us), so its session is hung up, as sshd does with a dead connection. */
            if (s->master >= 0)
                end_session(port, s, 1);
            if (start_session(s, payload, n) == 0)
                send_frame(port, APERTURE_SHELL_READY, NULL, 0);
            else
                send_frame(port, APERTURE_SHELL_EXIT, "\x7f\0\0\0", 4);
        } else if (kind == APERTURE_SHELL_DATA && s->master >= 0) {
            write_all(s->master, payload, n);
        } else if (kind == APERTURE_SHELL_WINSIZE && s->master >= 0) {
            set_winsize(s->master, payload, n);
            kill(-s->pid, SIGWINCH);
        } else if (kind == APERTURE_SHELL_HANGUP && s->master >= 0) {
            end_session(port, s, 1);
        }
        off += 3 + n;
    }
    return off;
}

static void relay(int port)
{
    static unsigned char in[2 * FRAME_MAX], out[FRAME_MAX];
    struct session s = {.master = -1, .pid = -1};
    size_t have = 0;

    for (;;) {
        struct pollfd fds[2] = {{.fd = port, .events = POLLIN}, {.fd = s.master, .events = POLLIN}};
        if (poll(fds, s.master >= 0 ? 2 : 1, 1000) < 0 && errno != EINTR)
            break;
        if (fds[0].revents & POLLIN) {
            ssize_t n = read(port, in + have, sizeof(in) - have);
            if (n > 0) {
                have += (size_t)n;
                size_t used = take_frames(port, &s, in, have);
                memmove(in, in + used, have - used);
                have -= used;
                if (have == sizeof(in))
                    have = 0; /* a frame longer than the buffer is not ours: drop it */
            } else {
                /* No host connected (the port reads EOF): a client that went away without a hangup (killed)
                 * leaves no session behind. */
                if (s.master >= 0)
                    end_session(port, &s, 1);
                have = 0;
                usleep(50000);
            }
        }
        if (s.master >= 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = read(s.master, out, sizeof(out));
            if (n > 0)
                send_frame(port, APERTURE_SHELL_DATA, out, (size_t)n);
            else
                end_session(port, &s, 0); /* EIO: the shell and everything on its terminal are gone */
        }
    }
}

/* Started once the guest is idle: the relay runs beside the serve loop, in a process of its own. */
void shell_start(void)
{
    pid_t pid = fork();
    if (pid != 0)
        return;
    int port = open_port(APERTURE_SHELL_PORT, O_RDWR);
    if (port < 0)
        _exit(0); /* this VM has no shell port */
    relay(port);
    _exit(0);
}
