# Run inside a guest: turn the ACPI power button into a power-off, as a
# distribution's logind or acpid would. busybox acpid runs
# /etc/acpi/PWRF/00000080 when the button's input event arrives. (It runs in
# the foreground, in the background of this script: daemonized, it does not
# survive under the lab's shell init; and it must be given a log file.)
mods=/lib/modules/$(uname -r)
insmod "$mods/button.ko" 2>/dev/null || say "button.ko did not load"
insmod "$mods/evdev.ko" 2>/dev/null || say "evdev.ko did not load"
mkdir -p /etc/acpi/PWRF
cat >/etc/acpi/PWRF/00000080 <<'SH'
#!/bin/sh
echo "LAB-L2: power button pressed" >/dev/console
poweroff -f
SH
chmod +x /etc/acpi/PWRF/00000080
acpid -f -l /tmp/acpid.log -c /etc/acpi &
say "power button: $(grep -h '^N: Name="Power Button"' /proc/bus/input/devices), $(grep -i ged /proc/interrupts | tr -s ' ')"
say "acpid ready"
sleep 600
