# Save and resume a VM that is running its own VM: L2 (nesting on, Debian)
# runs a ticking L3; L1 saves L2 mid-run, checks it is Saved and frozen,
# resumes it, three times; then checkpoints L2, lets L3 go on and restores
# the checkpoint; L3 finishes its count as if nothing had happened.
N=/nestvm/nestvm
export NESTVM_STATE_DIR=/tmp/state
LOG=/tmp/state/vms/l2/console.log
# L3 is the slow ticker (lab.l3=slow): TICKS ticks, far apart, so L2's
# vCPU is seldom out on its console when a save lands (see image.rs).
TICKS=60
ticks() { tr -cd . <"$LOG" | wc -c; }
$N vm new l2 --kernel /next/vmlinuz --initrd /next/initrd --memory 512M --nested on \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1 lab.script=l2-long-ticker-l3 lab.l3=slow"
$N vm start l2
require sr-l3-started wait_for "$LOG" "long ticker starting" 600
# Let L3 tick a while, then save L2 around it.
n=0
until [ "$(ticks)" -ge 4 ] || [ $n -ge 120 ]; do
    sleep 1
    n=$((n + 1))
done
# Three save/resume cycles while L3 ticks; at least one must catch L2's
# vCPU running L3 (in guest mode), so the nested state is what carried it.
# Where the pause lands is up to L1's scheduler: past the third, cycles go
# on (up to six) until one did.
: >/tmp/saves.txt
for cycle in 1 2 3 4 5 6; do
    if [ $cycle -gt 3 ] && grep -q "1 of 1 vCPUs were running their own guest" /tmp/saves.txt; then
        break
    fi
    $N vm save l2 >/tmp/save.txt 2>&1
    cat /tmp/save.txt | tee -a /tmp/saves.txt
    require "sr-save-$cycle-ok" grep -q "saved VM 'l2'" /tmp/save.txt
    check "sr-state-saved-$cycle" [ "$(vm_state l2)" = Saved ]
    BEFORE=$(ticks)
    say "cycle $cycle: ticks before resume: $BEFORE"
    check "sr-saved-mid-run-$cycle" sh -c "! grep -q 'long ticker done' $LOG"
    sleep 2
    check "sr-nothing-runs-while-saved-$cycle" [ "$(ticks)" = "$BEFORE" ]
    $N vm start l2 >/tmp/start.txt 2>&1
    cat /tmp/start.txt
    require "sr-resumed-$cycle" grep -q "resumed saved VM 'l2'" /tmp/start.txt
    n=0
    until [ "$(ticks)" -gt "$((BEFORE + 2))" ] || [ $n -ge 60 ]; do
        sleep 1
        n=$((n + 1))
    done
done
check sr-saved-in-guest-mode grep -q "1 of 1 vCPUs were running their own guest" /tmp/saves.txt

# Checkpoint L2 while L3 ticks, let L3 go on, restore the checkpoint: L3's
# count goes back to where it was, then on to the end. L3's ticks are the
# dots on the console's last line (they run on one line).
l3run() { tail -n 1 "$LOG" | tr -cd . | wc -c; }
$N vm pause l2
A=$(l3run)
$N vm checkpoint l2 --name c1 >/tmp/ck.txt 2>&1
cat /tmp/ck.txt
require ck-taken grep -q "took checkpoint 'c1'" /tmp/ck.txt
$N vm resume l2
n=0
until [ "$(l3run)" -gt $((A + 3)) ] || [ $n -ge 60 ]; do
    sleep 1
    n=$((n + 1))
done
check ck-l3-went-on [ "$(l3run)" -gt $((A + 3)) ]
$N vm checkpoints l2
$N vm pause l2
LEN=$(wc -c <"$LOG")
$N vm restore l2 c1 >/tmp/rs.txt 2>&1
cat /tmp/rs.txt
require ck-restored grep -q "restored checkpoint of VM 'l2'" /tmp/rs.txt
wait_live /tmp/state l2 "$LOG" "long ticker done" 600
AFTER=$(tail -c +$((LEN + 1)) "$LOG" | sed -n 's/^\(\.*\)LAB-TINY: long ticker done.*/\1/p' | tr -d '\n' | wc -c)
say "checkpoint at $A ticks; after restoring it: $AFTER more"
check ck-l3-back-then-on [ "$AFTER" = $((TICKS - A)) ]
check sr-l3-continues wait_live /tmp/state l2 "$LOG" "long ticker done" 600
check sr-l2-powered-off wait_state l2 Off 300
tail -n 5 "$LOG"
check sr-l3-all-ticks-in-one-run [ "$(sed -n 's/.*l3-ticks=\([0-9]*\).*/\1/p' "$LOG" | tail -n 1)" = "$TICKS" ]
check sr-l2-ended-cleanly sh -c "grep -q PowerOff /tmp/state/vms/l2/vmm.log"
# The checkpoint's restore gave L2 a new VM generation ID (saves keep it),
# through a device Linux's own vmgenid driver took.
ID0=$(sed -n 's/.*LAB-L2: vmgenid bound: [0-9]* id \([0-9a-f]*\).*/\1/p' "$LOG" | head -n 1)
ID1=$(sed -n 's/.*LAB-L2: vmgenid at the end: \([0-9a-f]*\).*/\1/p' "$LOG" | tail -n 1)
say "vmgenid at boot $ID0, at the end $ID1"
check ck-vmgenid-driver-bound grep -q "LAB-L2: vmgenid bound: 1 " "$LOG"
check ck-vmgenid-changed sh -c "[ \${#1} = 32 ] && [ \${#2} = 32 ] && [ \"\$1\" != \"\$2\" ]" - "$ID0" "$ID1"
