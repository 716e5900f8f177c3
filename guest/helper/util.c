/* Small utilities shared by scenarios: sysfs writes, pagemap, uuids, cache flushes. */
#include "report.h"

#include <cpuid.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int write_text(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = write(fd, value, strlen(value));
    int err = n < 0 ? -errno : 0;
    close(fd);
    return err;
}

int run_cmd(const char *cmdline)
{
    int st = system(cmdline);
    if (st < 0 || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

unsigned long long virt_to_phys(const void *addr)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t entry = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)addr / (uintptr_t)page) * 8;
    ssize_t n = pread(fd, &entry, sizeof(entry), off);
    close(fd);
    if (n != sizeof(entry) || !(entry & (1ULL << 63)))
        return 0;
    uint64_t pfn = entry & ((1ULL << 55) - 1);
    if (!pfn)
        return 0;
    return pfn * (uint64_t)page + ((uintptr_t)addr % (uintptr_t)page);
}

void random_uuid(char out[37])
{
    unsigned char b[16] = {0};
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, b, sizeof(b)) != (ssize_t)sizeof(b))
            memset(b, 0x5a, sizeof(b));
        close(fd);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
             b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

void fill_stamp(char *buf, size_t len, const char *unit)
{
    size_t ulen = strlen(unit);
    for (size_t i = 0; i < len; i++)
        buf[i] = unit[i % ulen];
}

static int cpu_has(int bit)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> bit) & 1;
}

const char *flush_method(void)
{
    if (cpu_has(24))
        return "clwb";
    if (cpu_has(23))
        return "clflushopt";
    return "clflush";
}

void flush_range(const void *addr, size_t len)
{
    const char *m = flush_method();
    uintptr_t p = (uintptr_t)addr & ~(uintptr_t)63, end = (uintptr_t)addr + len;
    for (; p < end; p += 64) {
        if (m[2] == 'w')
            asm volatile(".byte 0x66, 0x0f, 0xae, 0x30" ::"a"(p) : "memory"); /* clwb (%rax) */
        else if (m[7] == 'o')
            asm volatile(".byte 0x66, 0x0f, 0xae, 0x38" ::"a"(p) : "memory"); /* clflushopt (%rax) */
        else
            asm volatile("clflush (%0)" ::"r"(p) : "memory");
    }
    asm volatile("sfence" ::: "memory");
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int path_exists(const char *p) { return access(p, F_OK) == 0; }

/* First entry of dir whose name starts with prefix (and passes accept, if given). */
int find_entry(const char *dir, const char *prefix, char *out, size_t outlen,
                      int (*accept)(const char *dir, const char *name))
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    while (d && (e = readdir(d)) && !found) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0)
            continue;
        if (accept && !accept(dir, e->d_name))
            continue;
        snprintf(out, outlen, "%s", e->d_name);
        found = 1;
    }
    if (d)
        closedir(d);
    return found;
}

const char *errno_name(int e)
{
    switch (e) {
    case 0: return "ok";
    case EFAULT: return "EFAULT";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case ENOMEM: return "ENOMEM";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EREMOTEIO: return "EREMOTEIO";
    case EPERM: return "EPERM";
    case ENXIO: return "ENXIO";
    case ENODEV: return "ENODEV";
    case EACCES: return "EACCES";
    case EAGAIN: return "EAGAIN";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENOENT: return "ENOENT";
    case ENOSPC: return "ENOSPC";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return "EUNKNOWN";
    }
}

/* The device data pattern (emulator/results.py device_pattern): byte i = seed*7 + (i % 251)*13. */
void pattern_fill(uint8_t *buf, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = aperture_pattern_byte(seed, i);
}

int pattern_check(const uint8_t *buf, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != aperture_pattern_byte(seed, i))
            return 0;
    return 1;
}
