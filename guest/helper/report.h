/* Guest helper: JSON-lines reporting to the host over the results port, and small utilities every unit uses. */
#ifndef APERTURE_REPORT_H
#define APERTURE_REPORT_H

#include <stddef.h>

#include "aperture_abi.h" /* every name the host and the helper share */

/* A growable-enough JSON text buffer (fixed size: details are small). */
struct jbuf {
    char buf[16384];
    size_t len;
};

void jb_init(struct jbuf *jb);
void jb_printf(struct jbuf *jb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void jb_str(struct jbuf *jb, const char *s); /* appends a quoted, escaped JSON string */

void report_open(void);
int open_port(const char *name, int flags); /* a virtio-serial port by name, or -1 */
void report_line(const char *json);
int write_all(int fd, const void *buf, size_t len); /* 0, or -1 when the fd failed */
void report_raw(const void *buf, size_t len); /* as is, no newline: garbage for the fuzzer */
void report_hello(void);
void report_check(const char *name, int ok, const char *detail_json);
void report_on_check(void (*hook)(const char *name)); /* called after each check is reported */
void report_done(void);
void report_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Small helpers shared by scenarios. */
int read_text(const char *path, char *out, size_t outlen); /* 0 on success, trailing newline stripped */
const char *env_or(const char *name, const char *fallback);

/* sysfs / procfs utilities (util.c) */
int write_text(const char *path, const char *value);          /* 0 or -errno */
int run_cmd(const char *cmdline);                              /* system(), returns exit status or -1 */
unsigned long long virt_to_phys(const void *addr);             /* via /proc/self/pagemap; 0 if unknown */
void random_uuid(char out[37]);
void fill_stamp(char *buf, size_t len, const char *unit);      /* unit repeated, truncated to len */
void flush_range(const void *addr, size_t len);                /* clwb/clflushopt/clflush + sfence */
const char *flush_method(void);
double now_s(void);
int path_exists(const char *p);
/* First entry of dir whose name starts with prefix (and passes accept, if given); 1 if found. */
int find_entry(const char *dir, const char *prefix, char *out, size_t outlen,
               int (*accept)(const char *dir, const char *name));
const char *errno_name(int e); /* "ok", "EFAULT", ... */

/* NVDIMM regions (nvdimm.c), sorted by physical address */
#define MAX_REGIONS 16
struct region {
    char name[256];
    unsigned long long addr, size;
};
int nd_regions(struct region *out, int max, int expected);

/* The serve loop (serve.c): host commands on the command port, forever. */
void scenario_serve(void);
void shell_start(void); /* shell.c: the interactive shell relay, in a process of its own */
int p2pmem_probe_row(struct jbuf *jb); /* p2pmem.c: the probe matrix's p2pmem row; 1 if the read worked */
int helper_tool(int argc, char **argv); /* tools.c: info/map/unmap/dma/peek/poke/flood; -1 if not a tool */

#include <stdint.h>
void pattern_fill(uint8_t *buf, size_t len, uint32_t seed); /* the device data pattern (aperture_abi.h) */
int pattern_check(const uint8_t *buf, size_t len, uint32_t seed);

#endif
