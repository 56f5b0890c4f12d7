# Live-migrate a VM that is running its own VM: L2 (nesting on, Debian) runs
# a ticking L3; two nestvm "hosts" in L1 (two state directories) over
# loopback. First the receiver is killed mid-copy: the source VM runs on.
# Then L2 moves for real while L3 ticks: the source ends, the destination
# carries on, and L3 finishes its count in one unbroken run.
N=/nestvm/nestvm
export NESTVM_STATE_DIR=/tmp/src
DST=/tmp/dst
LOG=/tmp/src/vms/l2/console.log
DLOG=$DST/vms/l2/console.log
ticks() { tr -cd . <"$1" | wc -c; }
dst_state() { $N --state-dir $DST vm show l2 --json | sed -n 's/.*"state": *"\([A-Za-z]*\)".*/\1/p'; }
dst_off() {
    n=0
    until [ "$(dst_state)" = Off ] || [ $n -ge 300 ]; do
        sleep 1
        n=$((n + 1))
    done
    [ "$(dst_state)" = Off ]
}
# The two "hosts" talk over loopback.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
$N vm new l2 --kernel /next/vmlinuz --initrd /next/initrd --memory 512M --nested on \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1 lab.script=l2-long-ticker-l3"
$N vm start l2
check mg-l3-started wait_for "$LOG" "long ticker starting" 600
n=0
until [ "$(ticks "$LOG")" -ge 10 ] || [ $n -ge 120 ]; do
    sleep 1
    n=$((n + 1))
done

# 1. The receiver dies in the middle of the copy.
$N --state-dir $DST vm receive l2 --listen 127.0.0.1:7777 --token-file /tmp/token >/tmp/recv1.txt 2>&1 &
check mg-receiver-listens wait_for $DST/vms/l2/vmm.log "waiting for VM" 60
$N vm migrate l2 --to 127.0.0.1:7777 --token-file /tmp/token >/tmp/mig1.txt 2>&1 &
MIG=$!
check mg-copy-started wait_for $DST/vms/l2/vmm.log "receiving its memory" 60
sleep 1
kill -9 "$(cat $DST/vms/l2/vmm.pid)"
wait $MIG
RC=$?
cat /tmp/mig1.txt /tmp/recv1.txt
check mg-killed-receiver-fails-migration [ "$RC" = 1 ]
check mg-source-says-it-keeps-running grep -q "keeps running here" /tmp/mig1.txt
check mg-source-still-running [ "$(vm_state l2)" = Running ]
A=$(ticks "$LOG")
sleep 5
check mg-source-still-ticking [ "$(ticks "$LOG")" -gt "$A" ]
check mg-nothing-left-at-destination [ ! -e $DST/vms/l2/vm.toml ]

# 2. The real move, while L3 ticks.
$N --state-dir $DST vm receive l2 --listen 127.0.0.1:7777 --token-file /tmp/token >/tmp/recv2.txt 2>&1 &
RECV=$!
wait_for $DST/vms/l2/vmm.log "waiting for VM" 60
$N vm migrate l2 --to 127.0.0.1:7777 --token-file /tmp/token >/tmp/mig2.txt 2>&1
cat /tmp/mig2.txt
check mg-migrated grep -q "now runs at 127.0.0.1:7777" /tmp/mig2.txt
wait $RECV
cat /tmp/recv2.txt
check mg-received grep -q "arrived and runs here" /tmp/recv2.txt
check mg-source-ended [ "$(vm_state l2)" = Off ]
check mg-source-log-says-migrated grep -q "ended: Migrated" /tmp/src/vms/l2/vmm.log
check mg-destination-runs [ "$(dst_state)" = Running ]
check mg-l3-went-on-there wait_for "$DLOG" "\." 120
check mg-l3-continues-to-the-end wait_for "$DLOG" "long ticker done" 900
check mg-l2-powered-off-there dst_off
tail -n 5 "$DLOG"
check mg-l3-all-ticks-in-one-run [ "$(sed -n 's/.*l3-ticks=\([0-9]*\).*/\1/p' "$DLOG" | tail -n 1)" = 600 ]
