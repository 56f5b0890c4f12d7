# Run inside a guest: report what the guest sees of its machine.
say "nproc=$(nproc)"
say "memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
if grep -qw svm /proc/cpuinfo; then say "svm=yes"; else say "svm=no"; fi
if grep -qw hypervisor /proc/cpuinfo; then say "hypervisor=yes"; else say "hypervisor=no"; fi
