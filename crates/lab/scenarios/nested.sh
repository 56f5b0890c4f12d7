# Nested virtualization, in L1 (an emulated AMD-V host, kvm-amd nested=1):
# per-VM nesting on and off, a hypervisor inside L2 running tiny and Linux
# L3 guests, and vCPU state (nested state included) read and written back
# while L3 runs.
KERNEL="--kernel /next/vmlinuz --initrd /next/initrd"
CMD="console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1"

check l1-host-check-yes /nestvm/nestvm host check
/nestvm/nestvm host check --json >/tmp/check.json
check l1-host-check-json grep -q '"can_nest": true' /tmp/check.json

# Nesting on: L2 sees svm, loads kvm-amd, and its nestvm runs a tiny L3.
vm l2on 300 $KERNEL --memory 512M --nested on --cmdline "$CMD lab.script=l2-tiny-l3"
check l2on-exit-0 rc_is l2on 0
check l2on-kvm-amd-loaded logged l2on "LAB-L2: kvm-amd loaded nested=1"

# Nesting off: no svm in L2, kvm-amd refuses, nestvm in L2 says why (no hang).
vm l2off 300 $KERNEL --memory 512M --nested off --cmdline "$CMD lab.script=l2-no-nesting"
check l2off-exit-0 rc_is l2off 0
check l2off-kvm-amd-refused logged l2off "kvm-amd refused to load"

# vCPU state round trips (SIGUSR1) on L2 while its L3 ticker runs. L2
# keeps L3's console off its own (see vm_quiet in lib.sh): echoed, each
# tick took L2's vCPU out to this level's VMM, and one round trip in eight
# found it there rather than running L3; quiet, nineteen in twenty find L3.
: >/tmp/tick.log
vm tick 600 $KERNEL --memory 512M --nested on --cmdline "$CMD lab.script=l2-ticker-l3" &
n=0
until grep -q 'l3 is ticking' /tmp/tick.log || [ -f /tmp/tick.rc ] || [ $n -ge 300 ]; do
    sleep 1
    n=$((n + 1))
done
# Each signal goes once the previous round trip was reported (two pending
# signals would merge into one). Six at least, and on until one caught
# L2's vCPU running L3, for as long as L3 runs (a hundred at most): where
# a signal lands is up to L1's scheduler, so the scenario watches for it.
trips() { grep -c 'vCPU state round trip' /tmp/tick.log; }
l3_ended() { grep -q 'l3ticker exited' /tmp/tick.log || [ -f /tmp/tick.rc ]; }
i=0
while [ $i -lt 100 ] && ! l3_ended; do
    if [ $i -ge 6 ] && grep -q "in guest mode" /tmp/tick.log; then
        break
    fi
    i=$((i + 1))
    kill -USR1 "$(pidof nestvm)" 2>/dev/null
    n=0
    until [ "$(trips)" -ge $i ] || [ -f /tmp/tick.rc ] || [ $n -ge 600 ]; do
        sleep 0.1
        n=$((n + 1))
    done
done
wait
say "round trips: $(trips), in guest mode: $(grep -c 'in guest mode' /tmp/tick.log)"
check rt-exit-0 rc_is tick 0
check rt-six-round-trips [ "$(grep -c 'vCPU state round trip: vCPU 0' /tmp/tick.log)" -ge 6 ]
check rt-no-failure sh -c '! grep -q "round trip failed" /tmp/tick.log'
check rt-saved-svm-nested-state logged tick "nested state [0-9]* bytes (SVM"
check rt-one-in-guest-mode logged tick "in guest mode"
# L3 ran through them: every round trip came after it started ticking and
# before it ended, and it printed all its ticks.
check rt-l3-kept-running awk '/l3 is ticking/ { t = 1 } /vCPU state round trip/ { if (!t || e) bad = 1 } /l3ticker exited/ { e = 1 } END { exit bad || !e }' /tmp/tick.log
check rt-l3-all-ticks logged tick "LAB-L2: l3-ticks=600"

# Debian's kernel as L3, inside L2, inside L1.
vm l3linux 900 $KERNEL --memory 1G --nested on --cmdline "$CMD lab.script=l2-linux-l3"
check l3linux-l2-exit-0 rc_is l3linux 0
