/* Guest helper: JSON-lines reporting to the host over the aperture.results virtio-serial port. */
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
void report_raw(const void *buf, size_t len); /* as is, no newline: garbage for the fuzzer */
void report_hello(void);
void report_check(const char *name, int ok, const char *detail_json);
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

/* Scenarios: each reports its own checks. */
void scenario_nvdimm(void);
void scenario_dax(int bench);
void scenario_aperture(int bench);
void scenario_remap(void);
void scenario_serve(void);
void scenario_p2pmem(void);  /* p2pmem.c: zone_device.p2pmem, p2p.nvme_cmb */
int p2pmem_probe_row(struct jbuf *jb); /* the probe matrix's p2pmem row, a JSON object; 1 if the read worked */
void scenario_witness(void); /* witness.c: witness.hmm_tests */
void scenario_fuzz(void);    /* fuzz.c: aperture.fuzz, a hostile guest for $aperture_duration seconds */
int helper_tool(int argc, char **argv); /* map/unmap/dma/peek/poke/info; -1 if argv[1] is not a tool */

#include <stdint.h>
void pattern_fill(uint8_t *buf, size_t len, uint32_t seed);  /* the device data pattern */
int pattern_check(const uint8_t *buf, size_t len, uint32_t seed);

/* aperture.c API for other scenarios */
int aperture_discover(void);
uint32_t aperture_nr_slots(int i);
uint64_t aperture_slot_size(int i);
uint8_t *aperture_window(int i);
uint32_t aperture_generation(int i);
uint32_t aperture_snapshot(int i, uint64_t *table, uint64_t *retries);
int aperture_remap_window(int i, double wait_s); /* re-probe a re-plugged window (hotplug mode) */
int aperture_dma(int i, uint64_t src, uint64_t dst, uint64_t len, uint16_t flags);
int aperture_ram_page(void **buf, unsigned long long *phys);
/* Raw access for the fuzzer: control memory, the doorbell, and re-reading the ring indices afterwards. */
volatile uint8_t *aperture_ctl(int i);
void aperture_doorbell(int i);
void aperture_resync(int i);
int aperture_nop(int i); /* a NOP through the normal path: the status, or -1 on timeout */
unsigned long long aperture_window_phys(int i);
unsigned long long aperture_stale_completions(void);

#endif
