# Dynamic memory for a VM that is running its own VM: L2 (nesting on,
# Debian, 512 MiB with a balloon down to 256 MiB) runs a ticking L3 while
# L1 shrinks it, grows it back, hands it to the automatic policy, saves and
# resumes it with its balloon, and L3 finishes its count in one run.
N=/nestvm/nestvm
export NESTVM_STATE_DIR=/tmp/state
LOG=/tmp/state/vms/l2/console.log
mem() { $N vm memory l2 --json >/tmp/mem.json 2>&1; cat /tmp/mem.json; }
field() { sed -n "s/.*\"$1\": *\([0-9a-z]*\).*/\1/p" /tmp/mem.json | head -n 1; }
# The VMM's resident memory now (VmRSS) or at its peak (VmHWM), MiB.
rss_mib() { echo $(( $(sed -n "s/^${1:-VmRSS}:[[:space:]]*\([0-9]*\) kB/\1/p" /proc/"$(cat /tmp/state/vms/l2/vmm.pid)"/status) / 1024 )); }
# L3 still ticks: a new tick comes (within a minute).
still_ticking() { dots_past "$LOG" "$(dots "$LOG")" 60; }
# mem_until TEST...: polls the balloon's figures until TEST holds (the guest
# follows a new target at its own pace), for up to a minute.
mem_until() {
    n=0
    until { mem >/dev/null && "$@" 2>/dev/null; } || [ $n -ge 60 ]; do
        sleep 1
        n=$((n + 1))
    done
    mem
    "$@"
}
total_below() { [ "$(field total)" -lt "$1" ]; }
total_above() { [ "$(field total)" -gt "$1" ]; }
$N vm new l2 --kernel /next/vmlinuz --initrd /next/initrd --memory 512M --nested on \
    --balloon dynamic=off,min=256M \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1 lab.script=l2-long-ticker-l3 lab.l3=longer lab.fill=320"
$N vm start l2
require bl-l3-started wait_for "$LOG" "long ticker starting" 600
# The driver's first statistics.
n=0
until mem >/dev/null && [ -n "$(field total)" ] || [ $n -ge 60 ]; do
    sleep 1
    n=$((n + 1))
done
mem
require bl-guest-reports-statistics [ -n "$(field total)" ]
RSS0=$(rss_mib)
say "rss before: $RSS0 MiB"

# Shrink to 256 MiB while L3 runs.
$N vm resize l2 256M >/tmp/resize1.txt 2>&1
cat /tmp/resize1.txt
check bl-shrunk grep -q "256 MiB now" /tmp/resize1.txt
check bl-guest-sees-less mem_until total_below $((300 << 20))
say "rss after shrinking: $(rss_mib) MiB (peak $(rss_mib VmHWM) MiB)"
# L2 touched 320 MiB at boot (lab.fill), more than it may keep now; the
# pages it handed over (and those it reported free) left L1's RSS, which
# holds at most the new size and the VMM's own few MiB. Free-page reporting
# may have returned some first: either way they are gone, and the peak
# says they were there.
check bl-guest-touched-its-memory [ "$(rss_mib VmHWM)" -gt $((256 + 32)) ]
check bl-host-got-memory-back [ "$(rss_mib)" -le $((256 + 32)) ]
check bl-l3-ticks-while-small still_ticking

# Grow back.
$N vm resize l2 512M >/tmp/resize2.txt 2>&1
cat /tmp/resize2.txt
check bl-grown grep -q "512 MiB now" /tmp/resize2.txt
check bl-guest-sees-more mem_until total_above $((400 << 20))
check bl-l3-ticks-after-growing still_ticking

# Out of range is refused; the automatic policy takes over.
check bl-below-min-refused sh -c "! $N vm resize l2 128M"
$N vm resize l2 auto >/tmp/auto.txt 2>&1
cat /tmp/auto.txt
n=0
until mem >/dev/null && [ "$(field target)" -lt $((512 << 20)) ] || [ $n -ge 60 ]; do
    sleep 1
    n=$((n + 1))
done
mem
check bl-auto-follows-demand [ "$(field target)" -lt $((512 << 20)) ]
check bl-auto-flag [ "$(field auto)" = true ]

# Save and resume with the balloon inflated: it comes back as it was.
$N vm resize l2 300M >/dev/null 2>&1
$N vm save l2 >/tmp/save.txt 2>&1
cat /tmp/save.txt
require bl-saved grep -q "saved VM 'l2'" /tmp/save.txt
$N vm start l2
mem
check bl-balloon-resumed [ "$(field current)" = $((300 << 20)) ]
check bl-l3-ticks-after-resume still_ticking

check bl-l3-continues-to-the-end wait_live /tmp/state l2 "$LOG" "long ticker done" 1200
check bl-l2-powered-off wait_state l2 Off 300
tail -n 5 "$LOG"
check bl-l3-all-ticks-in-one-run [ "$(sed -n 's/.*l3-ticks=\([0-9]*\).*/\1/p' "$LOG" | tail -n 1)" = 2400 ]
# What the VMM said (its balloon summary, and why it stopped if L2 did
# not finish).
tail -n 40 /tmp/state/vms/l2/vmm.log
