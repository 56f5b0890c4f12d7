# Live-migrate a VM that is running its own VM: L2 (nesting on, Debian) runs
# a ticking L3; two nestvm "hosts" in L1 (two state directories) over
# loopback. First the receiver is killed mid-copy: the source VM runs on.
# Then L2 moves for real while L3 ticks: the source ends, the destination
# carries on, and L3 finishes its count in one unbroken run.
N=/nestvm/nestvm
export NESTVM_STATE_DIR=/tmp/src
SRC=/tmp/src
DST=/tmp/dst
LOG=$SRC/vms/l2/console.log
DLOG=$DST/vms/l2/console.log
# The source's view of its outgoing migration (vm show while one runs).
show_migration() { $N vm show l2 --json >/tmp/show.json 2>&1; }
field() { sed -n "s/.*\"$1\": *\"*\([0-9a-z]*\).*/\1/p" /tmp/show.json | head -n 1; }
copy_under_way() {
    n=0
    until { show_migration && [ "$(field sent_bytes)" -gt 0 ] 2>/dev/null; } || [ $n -ge 300 ]; do
        sleep 0.2
        n=$((n + 1))
    done
    [ "$(field sent_bytes)" -gt 0 ] 2>/dev/null
}
# With the receiver frozen: the source is still in its first round and the
# destination has not taken the VM over.
mid_copy() {
    show_migration && [ "$(field phase)" = precopy ] && [ "$(field rounds)" = 0 ] &&
        [ "$(field max_bandwidth)" = $((2 << 20)) ] && [ ! -e $DST/vms/l2/vm.toml ]
}
dst_off() {
    n=0
    until [ "$(state_in $DST l2)" = Off ] || [ $n -ge 300 ]; do
        sleep 1
        n=$((n + 1))
    done
    [ "$(state_in $DST l2)" = Off ]
}
# The two "hosts" talk over loopback.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
$N vm new l2 --kernel /next/vmlinuz --initrd /next/initrd --memory 512M --nested on \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1 lab.script=l2-long-ticker-l3"
$N vm start l2
require mg-l3-started wait_for "$LOG" "long ticker starting" 600
require mg-l3-ticking dots_past "$LOG" 9 120

# 1. The receiver dies in the middle of the copy. The copy is capped at
# 2 MiB/s, so the first round (all of L2's written memory, tens of MiB)
# lasts many seconds; the receiver is frozen once bytes flow, the state is
# checked (it cannot change while frozen), and only then killed.
$N --state-dir $DST vm receive l2 --listen 127.0.0.1:7777 --token-file /tmp/token >/tmp/recv1.txt 2>&1 &
RECV1=$!
require mg-receiver-listens wait_for $DST/vms/l2/vmm.log "waiting for VM" 60
$N vm migrate l2 --to 127.0.0.1:7777 --token-file /tmp/token --max-bandwidth 2M >/tmp/mig1.txt 2>&1 &
MIG=$!
require mg-copy-started wait_for $DST/vms/l2/vmm.log "receiving its memory" 60
require mg-copy-under-way copy_under_way
RPID=$(cat $DST/vms/l2/vmm.pid)
require mg-receiver-frozen freeze "$RPID"
cat /tmp/show.json
require mg-killed-mid-copy mid_copy
kill -9 "$RPID"
wait $MIG
RC=$?
# The first receiver has cleared its directory once it has exited.
wait $RECV1
cat /tmp/mig1.txt /tmp/recv1.txt
check mg-killed-receiver-fails-migration [ "$RC" = 1 ]
check mg-source-says-it-keeps-running grep -q "keeps running here" /tmp/mig1.txt
require mg-source-still-running [ "$(vm_state l2)" = Running ]
check mg-source-still-ticking dots_past "$LOG" "$(dots "$LOG")" 60
check mg-nothing-left-at-destination [ ! -e $DST/vms/l2/vm.toml ]

# 2. The real move, while L3 ticks.
$N --state-dir $DST vm receive l2 --listen 127.0.0.1:7777 --token-file /tmp/token >/tmp/recv2.txt 2>&1 &
RECV=$!
require mg-receiver-listens-again wait_for $DST/vms/l2/vmm.log "waiting for VM" 60
$N vm migrate l2 --to 127.0.0.1:7777 --token-file /tmp/token >/tmp/mig2.txt 2>&1
cat /tmp/mig2.txt
require mg-migrated grep -q "now runs at 127.0.0.1:7777" /tmp/mig2.txt
wait $RECV
cat /tmp/recv2.txt
check mg-received grep -q "arrived and runs here" /tmp/recv2.txt
check mg-source-ended [ "$(vm_state l2)" = Off ]
check mg-source-log-says-migrated grep -q "ended: Migrated" $SRC/vms/l2/vmm.log
# Should it not run there, say what its VMM said.
[ "$(state_in $DST l2)" = Running ] || { echo "destination: $(state_in $DST l2)"; tail -n 40 $DST/vms/l2/vmm.log; }
require mg-destination-runs [ "$(state_in $DST l2)" = Running ]
check mg-l3-went-on-there wait_live $DST l2 "$DLOG" "\." 120
check mg-l3-continues-to-the-end wait_live $DST l2 "$DLOG" "long ticker done" 900
check mg-l2-powered-off-there dst_off
tail -n 5 "$DLOG"
check mg-l3-all-ticks-in-one-run [ "$(sed -n 's/.*l3-ticks=\([0-9]*\).*/\1/p' "$DLOG" | tail -n 1)" = 600 ]
# A migrated VM is the same VM: it keeps its VM generation ID.
ID0=$(sed -n 's/.*LAB-L2: vmgenid bound: [0-9]* id \([0-9a-f]*\).*/\1/p' "$LOG" | head -n 1)
ID1=$(sed -n 's/.*LAB-L2: vmgenid at the end: \([0-9a-f]*\).*/\1/p' "$DLOG" | tail -n 1)
say "vmgenid at the source $ID0, at the end $ID1"
check mg-vmgenid-kept sh -c "[ \${#1} = 32 ] && [ \"\$1\" = \"\$2\" ]" - "$ID0" "$ID1"
