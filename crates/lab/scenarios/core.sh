# The core, in L1 (an emulated AMD-V host): nestvm boots Debian's kernel as
# L2 with an initramfs, with SMP, memory below and above 4 GiB, an
# interactive console, and the guest's own power-off and reboot.
KERNEL="--kernel /next/vmlinuz --initrd /next/initrd"
CMD="console=ttyS0 reboot=k panic=-1 lab.level=2"

check l1-has-svm grep -qw svm /proc/cpuinfo
check l1-has-kvm test -c /dev/kvm

# 2 vCPUs, 512 MiB: init runs, nproc is 2, MemTotal matches, poweroff ends nestvm with 0.
vm smp 300 $KERNEL --cpus 2 --memory 512M --cmdline "$CMD lab.script=report"
check smp-exit-0 rc_is smp 0
check smp-init-reached logged smp "LAB-L2: init reached"
check smp-nproc-2 [ "$(value smp nproc)" = 2 ]
check smp-memtotal-512m between $((512 * 1024 * 85 / 100)) $((512 * 1024)) "$(value smp memtotal_kb)"
check smp-hypervisor-bit [ "$(value smp hypervisor)" = yes ]
check smp-acpi-poweroff logged smp "reboot: Power down"

# 5 GiB: RAM above the 32-bit hole is found through e820.
vm big 300 $KERNEL --cpus 1 --memory 5G --cmdline "$CMD quiet lab.script=report"
check big-exit-0 rc_is big 0
check big-nproc-1 [ "$(value big nproc)" = 1 ]
check big-memtotal-5g between $((5 * 1024 * 1024 * 90 / 100)) $((5 * 1024 * 1024)) "$(value big memtotal_kb)"

# The same settings from a TOML file, with a flag overriding it.
cat >/tmp/vm.toml <<TOML
kernel = "/next/vmlinuz"
initrd = "/next/initrd"
cpus = 1
memory = "256M"
cmdline = "$CMD quiet lab.script=report"
TOML
vm cfg 300 --config /tmp/vm.toml --cpus 2
check cfg-exit-0 rc_is cfg 0
check cfg-flag-overrides-file [ "$(value cfg nproc)" = 2 ]
check cfg-memtotal-256m between $((256 * 1024 * 80 / 100)) $((256 * 1024)) "$(value cfg memtotal_kb)"

# An interactive shell on the console: typed input reaches the guest.
printf 'echo "LAB-L2: answer=$((6 * 7))"\nexit\n' >/tmp/typed
vm_typed shell 300 /tmp/typed $KERNEL --memory 256M --cmdline "$CMD quiet lab.script=shell"
check shell-exit-0 rc_is shell 0
check shell-input-reached-guest logged shell "LAB-L2: answer=42"
check shell-ended logged shell "LAB-L2: shell ended"
