/* The fixtures the checks need and what units share; the checks themselves register with TEST (harness.h). */
#ifndef APERTURE_CHECKS_H
#define APERTURE_CHECKS_H

#include <stddef.h>
#include <stdint.h>

#include "harness.h"

struct apdev;
struct daxmap;

/* dax.c */
extern const struct fixture fixture_dax_configured; /* NVDIMM regions in the modes the host asked for */
extern const struct fixture fixture_dax;            /* ... mounted (fsdax) and mapped (devdax) */
struct dax_mappings {
    char *devdax;      /* the devdax mapping, or NULL */
    size_t devdax_size;
    char *fsdax_file;  /* a 2 MiB mapping of a file on the fsdax mount, or NULL */
};
struct dax_mappings dax_mappings(void);

/* checks_device.c */
extern const struct fixture fixture_devices; /* the aperture devices, discovered, and a devdax mapping */
const struct daxmap *devices_daxmap(void);
uint64_t scratch_page(struct apdev *d, unsigned k);

/* checks_driver.c: the guest kernel driver (fixture: the last device bound to it) */
extern const struct fixture fixture_kdev;

/* Benchmarks: bench_dax.c (fixture dax), bench_device.c (fixture devices). */
void bench_dax(void);
void bench_device(void);
void bench_driver(void); /* checks_driver.c, fixture kdev */

#endif
