#!/bin/busybox sh
# aperture guest /init: mount, load modules, run the helper, power off. Never returns to the kernel.
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mkdir -p /proc /sys /dev /tmp /run /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts   # pseudo-terminals: the guest shell
mount -t tmpfs tmpfs /run
# The helper hands guest-physical addresses of mlock()ed buffers to the device's DMA engine. Userspace cannot
# pin pages, and compaction may migrate mlocked pages (new physical address, DMA reads a stale page): forbid it.
echo 0 > /proc/sys/vm/compact_unevictable_allowed 2>/dev/null
: > /run/modules.failed
for m in $(cat /etc/aperture/modules); do
    insmod "/lib/modules/$m.ko" 2>>/run/modules.err || printf '%s ' "$m" >> /run/modules.failed
done
# Host directories (--share): TAG:GUESTDIR:ro|rw, comma separated; failures go to /run/shares.failed.
: > /run/shares.failed
for share in $(echo "${aperture_shares:-}" | tr ',' ' '); do
    tag=${share%%:*}; rest=${share#*:}; dir=${rest%:*}; mode=${rest##*:}
    # read-only: cache data and metadata (nothing written here to lose, host changes mid-run unseen);
    # read-write: cache=mmap, so every write reaches the host at once (the VM may be stopped any time).
    cache=mmap; [ "$mode" = ro ] && cache=loose
    mkdir -p "$dir" && mount -t 9p -o "trans=virtio,version=9p2000.L,msize=524288,cache=$cache,$mode" "$tag" "$dir" \
        || printf '%s ' "$dir" >> /run/shares.failed
done
echo "aperture: helper starting at $(cut -d' ' -f1 /proc/uptime)s"
/bin/aperture-helper "${aperture_scenario:-default}"
echo "aperture: helper exited with status $?"
sync
poweroff -f
