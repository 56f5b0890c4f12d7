# In L2 (nesting on): an L3 guest that ticks 600 times (about a minute) and
# then says it is done; the level above saves and resumes L2 meanwhile.
# Reports how many ticks L3 printed in one unbroken run.
# The balloon driver, for levels above that resize this VM's memory.
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_mmio virtio_balloon; do
    insmod "$mods/$m.ko" 2>/dev/null
done
# The VM generation ID this guest sees (nestvm's ACPI VGEN device puts it
# at 0xff000, in the first MiB that /dev/mem shows), and whether Linux's
# vmgenid driver took the device; again at the end, after any restores.
genid() { dd if=/dev/mem bs=16 count=1 skip=$((0xff000 / 16)) 2>/dev/null | od -An -tx1 | tr -d ' \n'; }
say "vmgenid bound: $(ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | grep -c :) id $(genid)"
# lab.fill=MiB: write that much to a file and remove it, so this guest has
# touched that much of its memory (the level above checks that a shrink
# gives it back).
fill=$(arg fill)
if [ -n "$fill" ]; then
    dd if=/dev/zero of=/fill bs=1M count="$fill" 2>/dev/null
    rm -f /fill
    say "filled and freed $fill MiB"
fi
say "long ticker starting"
# lab.l3=longer: four times as many ticks; lab.l3=slow: a tenth as many, as
# far apart (the same run time, a tenth of the console output).
L3=/guests/ticker-long.elf
[ "$(arg l3)" = longer ] && L3=/guests/ticker-longer.elf
[ "$(arg l3)" = slow ] && L3=/guests/ticker-slow.elf
vm l3long 1800 --kernel $L3 --memory 16M
check l2-long-ticker-exit-0 rc_is l3long 0
say "vmgenid at the end: $(genid)"
say "l3-ticks=$(sed -n 's/^\(\.*\)LAB-TINY: long ticker done.*/\1/p' /tmp/l3long.log | tr -d '\n' | wc -c)"
