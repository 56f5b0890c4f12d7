# `nestvm host enable-nested`, in an L1 whose kvm-amd was loaded nested=0.
KERNEL="--kernel /next/vmlinuz --initrd /next/initrd"
nested() { cat /sys/module/kvm_amd/parameters/nested; }

check en-starts-nested-0 [ "$(nested)" = 0 ]
/nestvm/nestvm host check >/tmp/check.txt
echo "rc=$?" >>/tmp/check.txt
cat /tmp/check.txt
check en-check-says-no grep -q "Verdict: NO" /tmp/check.txt
check en-check-exit-1 grep -q "rc=1" /tmp/check.txt
check en-check-names-cause grep -q "kvm_amd is loaded with nested=0" /tmp/check.txt
check en-check-gives-fix grep -q "options kvm_amd nested=1" /tmp/check.txt

# A VM with --nested on is refused before it is built.
vm refused 60 --kernel /guests/hello-reset.elf --memory 16M --nested on
check en-nested-on-refused rc_is refused 1
check en-nested-on-says-why logged refused "nested=0"

# Dry run: lists the plan, changes nothing.
/nestvm/nestvm host enable-nested >/tmp/dry.txt 2>&1
cat /tmp/dry.txt
check en-dry-run-lists-line grep -q "options kvm_amd nested=1" /tmp/dry.txt
check en-dry-run-changes-nothing sh -c '[ "$(cat /sys/module/kvm_amd/parameters/nested)" = 0 ] && [ ! -e /etc/modprobe.d/nestvm-nested.conf ]'

# While a VM holds kvm_amd it is not reloaded, and KVM stays loaded. The
# VM halts until it is stopped, and enable-nested runs once it has printed
# (so it holds kvm_amd then, and still does).
/nestvm/nestvm run --kernel /guests/halt.elf --memory 16M >/tmp/busy-vm.txt 2>&1 </dev/null &
BUSY=$!
require en-busy-vm-runs wait_for /tmp/busy-vm.txt "halted until stopped" 60
/nestvm/nestvm host enable-nested --yes >/tmp/busy.txt 2>&1
echo "rc=$?" >>/tmp/busy.txt
cat /tmp/busy.txt
check en-busy-refused grep -q "rc=1" /tmp/busy.txt
check en-busy-says-in-use grep -q "in use" /tmp/busy.txt
check en-busy-kvm-still-loaded test -c /dev/kvm
check en-busy-vm-outlived-it kill "$BUSY"
wait

# Applied: the file is written and kvm_amd reloaded with nested=1.
/nestvm/nestvm host enable-nested --yes >/tmp/yes.txt 2>&1
echo "rc=$?" >>/tmp/yes.txt
cat /tmp/yes.txt
check en-applied grep -q "rc=0" /tmp/yes.txt
check en-now-nested-1 [ "$(nested)" = 1 ]
check en-file-written grep -qx "options kvm_amd nested=1" /etc/modprobe.d/nestvm-nested.conf
check en-check-now-yes /nestvm/nestvm host check
/nestvm/nestvm host enable-nested >/tmp/again.txt 2>&1
check en-second-run-changes-nothing grep -q "already enabled" /tmp/again.txt

# And a VM now sees svm.
vm after 300 $KERNEL --memory 256M --nested on --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.script=report"
check en-vm-after-exit-0 rc_is after 0
check en-vm-after-sees-svm [ "$(value after svm)" = yes ]
