#!/bin/sh
# The lab's /init, the same at every level (L1, L2, L3). The kernel command
# line says which level this is (lab.level=N), whether to load kvm-amd and
# with which nested= value (lab.nested=0|1), and which script of /lab to run
# (lab.script=NAME). Then it powers off, which ends the VMM of this level.
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
# No process can pivot_root away from the initramfs's own root (rootfs),
# which programs that sandbox themselves in a mount namespace do (passt,
# behind --net user): /init starts again with a bind mount of it as root.
if [ -z "$LAB_REROOTED" ]; then
    mkdir -p /.root
    mount -o bind / /.root
    cd /.root
    mount -o move . /
    LAB_REROOTED=1 exec chroot . /init
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "lab.$1="*) echo "${w#lab.$1=}" ;; esac
    done
}
LEVEL=$(arg level)
export LEVEL
. /lab/lib.sh
say "init reached"
NESTED=$(arg nested)
if [ -n "$NESTED" ] && [ -f "/lib/modules/$(uname -r)/kvm-amd.ko" ]; then
    load_kvm "$NESTED"
fi
SCRIPT=$(arg script)
if [ -n "$SCRIPT" ]; then
    if [ -f "/lab/$SCRIPT.sh" ]; then
        . "/lab/$SCRIPT.sh"
    else
        say "no script /lab/$SCRIPT.sh"
    fi
fi
say "done"
sync
poweroff -f
