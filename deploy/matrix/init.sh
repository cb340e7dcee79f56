#!/bin/busybox sh
# The kernel-matrix guest's /init (deploy/matrix/run.py builds the initramfs around it): load
# the 9p modules, mount the host's root read-only over 9p with writable tmpfs where the agent
# and the smoke suite write, put this kernel's modules and headers in place, run the smoke
# suite in that root, and power off. run.py fills in @REPO@.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "matrix: kernel $(uname -r), loading 9p modules"
for m in $(cat /modules.order); do
    insmod "/modules/$m" || echo "matrix: insmod $m failed"
done
mkdir -p /host /kernel /out
opts="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$opts,ro" hostroot /host || { echo "matrix: cannot mount the host root"; poweroff -f; }
mount -t 9p -o "$opts,ro" kernel /kernel
mount -t 9p -o "$opts" out /out
for d in tmp run var/log var/lib/coroot-agent root var/cache; do
    mount -t tmpfs tmpfs "/host/$d"
done
mount --bind /kernel/lib/modules /host/lib/modules
mount --bind /kernel/usr/src /host/usr/src
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tracefs tracefs /host/sys/kernel/tracing
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mkdir -p /host/tmp/out
mount --bind /out /host/tmp/out
echo "matrix: running the smoke suite"
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    /bin/sh -c "ip link set lo up; cd @REPO@ && /opt/coroot-agent/venv/bin/python deploy/matrix/smoke.py --out /tmp/out/result.json" \
    > /out/smoke.log 2>&1
echo "matrix: smoke suite exited with $?"
sync
poweroff -f
