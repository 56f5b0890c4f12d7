# Benchmarks (not a test): the same L2 guest, disk image and bridged TAP
# under nestvm and under QEMU (-accel kvm, microvm with ACPI-declared
# virtio-mmio, the same transport nestvm uses), alternating, twice each.
# Prints "LAB-BENCH vmm=... boot_s=... write_mibs=... read_mibs=...
# net_mibs=..." lines for nestvm-bench. Absolute figures are TCG-bound;
# only the ratios mean something.
N=/nestvm/nestvm
QEMU=/usr/bin/qemu-system-x86_64
mods=/lib/modules/$(uname -r)
for m in tun llc stp bridge; do
    insmod "$mods/$m.ko" || say "insmod $m failed"
done
brctl addbr br0
ip addr add 10.0.0.1/24 dev br0
ip link set br0 up
mkdir -p /srv
dd if=/dev/urandom of=/srv/blob bs=1M count=32 2>/dev/null
httpd -p 8080 -h /srv
now() { cut -d' ' -f1 /proc/uptime; }
K=/next/vmlinuz
I=/next/initrd
CMD="console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.script=l2-bench"

one() {
    vmm=$1
    run=$2
    log=/tmp/bench-$vmm-$run.log
    : >"$log"
    rm -f /tmp/bench.img
    dd if=/dev/zero of=/tmp/bench.img bs=1M count=64 2>/dev/null
    t0=$(now)
    case $vmm in
    nestvm)
        timeout 900 $N run --kernel $K --initrd $I --memory 256M --nested off \
            --disk path=/tmp/bench.img --net tap=tap0 --cmdline "$CMD" >"$log" 2>&1 </dev/null &
        ;;
    qemu)
        timeout 900 $QEMU -M microvm,acpi=on -accel kvm -cpu host -m 256M -smp 1 \
            -nodefaults -no-user-config -display none -serial stdio -no-reboot \
            -kernel $K -initrd $I -append "$CMD" \
            -drive id=d0,file=/tmp/bench.img,format=raw,if=none -device virtio-blk-device,drive=d0 \
            -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=n0 \
            >"$log" 2>&1 </dev/null &
        ;;
    esac
    n=0
    until [ -d /sys/class/net/tap0 ] || [ $n -ge 600 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    brctl addif br0 tap0
    ip link set tap0 up
    n=0
    until grep -q "LAB-L2: init reached" "$log" || [ $n -ge 6000 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    t1=$(now)
    wait
    boot=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    metrics=$(sed -n 's/.*BENCH-L2 //p' "$log" | tail -n 1)
    echo "LAB-BENCH vmm=$vmm run=$run boot_s=$boot $metrics"
    check "bench-$vmm-$run-complete" grep -q "BENCH-L2 write" "$log"
    grep -E "LAB-|error|Error" "$log" | head -n 20
}
for run in 1 2; do
    one nestvm $run
    one qemu $run
done

# Save/restore and live migration of L2 while it runs its own L3 (nesting
# on), nestvm against QEMU in the same L1. QEMU's save is "migrate to a
# file" (what libvirt's save does; savevm needs a qcow2 disk) and its
# restore is -incoming from that file; its live migration goes between two
# QEMU processes over loopback, as nestvm's between two state directories.
# Prints "LAB-BENCH vmm=... run=... save_s= restore_s= mig_s= downtime_ms=".
# mig_s and downtime_ms are what each VMM reports for its migration (nestvm's
# result line, QEMU's "info migrate": total time and downtime).
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
MCMD="console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.nested=1 lab.script=l2-long-ticker-l3"
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

nestvm_moves() {
    run=$1
    export NESTVM_STATE_DIR=/tmp/nm-$run
    rm -rf /tmp/nm-$run /tmp/nm-$run-dst
    $N vm new l2 --kernel $K --initrd $I --memory 256M --nested on --cmdline "$MCMD" >/dev/null
    $N vm start l2 >/dev/null
    wait_for /tmp/nm-$run/vms/l2/console.log "long ticker starting" 600
    t0=$(now)
    $N vm save l2 >/dev/null
    t1=$(now)
    $N vm start l2 >/dev/null
    t2=$(now)
    $N --state-dir /tmp/nm-$run-dst vm receive l2 --listen 127.0.0.1:7800 --token-file /tmp/nm-token >/dev/null 2>&1 &
    wait_for /tmp/nm-$run-dst/vms/l2/vmm.log "waiting for VM" 60
    $N vm migrate l2 --to 127.0.0.1:7800 --token-file /tmp/nm-token >/tmp/nm-mig.txt 2>&1
    wait
    cat /tmp/nm-mig.txt
    down=$(sed -n 's/.*downtime \([0-9]*\) ms.*/\1/p' /tmp/nm-mig.txt)
    total=$(sed -n 's/.* sent in \([0-9.]*\) s,.*/\1/p' /tmp/nm-mig.txt)
    echo "LAB-BENCH vmm=nestvm-moves run=$run save_s=$(secs $t0 $t1) restore_s=$(secs $t1 $t2) mig_s=$total downtime_ms=$down"
    check "bench-nestvm-moves-$run-migrated" grep -q "now runs at" /tmp/nm-mig.txt
    $N --state-dir /tmp/nm-$run-dst vm kill l2 >/dev/null
    unset NESTVM_STATE_DIR
}

# qemu_monitor NAME: a QEMU monitor on FIFOs /tmp/NAME.in and .out; its
# output is collected in /tmp/NAME.log.
qemu_start() {
    name=$1
    shift
    rm -f /tmp/$name.in /tmp/$name.out
    mkfifo /tmp/$name.in /tmp/$name.out
    $QEMU -M microvm,acpi=on -accel kvm -cpu host -m 256M -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial file:/tmp/$name.console -monitor pipe:/tmp/$name \
        -kernel $K -initrd $I -append "$MCMD" "$@" >/tmp/$name.err 2>&1 &
    cat /tmp/$name.out >/tmp/$name.log &
}
hmp() { echo "$2" >/tmp/$1.in; }
# qemu_poll NAME COMMAND PATTERN TRIES: sends monitor COMMAND every 0.1 s
# until the monitor's output matches PATTERN (grep -E), TRIES times at most.
qemu_poll() {
    n=0
    until grep -Eq "$3" /tmp/$1.log || [ $n -ge "$4" ]; do
        hmp "$1" "$2"
        sleep 0.1
        n=$((n + 1))
    done
}
# qemu_wait_status NAME PATTERN: until "info status" matches (a minute at most).
qemu_wait_status() { qemu_poll "$1" "info status" "$2" 600; }
# qemu_wait_migrated NAME: polls "info migrate" until completed (or failed).
qemu_wait_migrated() {
    qemu_poll "$1" "info migrate" "Migration status: (completed|failed)" 3000
    grep -q "Migration status: completed" /tmp/$1.log
}

qemu_moves() {
    run=$1
    : >/tmp/qs.console
    qemu_start qs
    wait_for /tmp/qs.console "long ticker starting" 600
    t0=$(now)
    hmp qs "stop"
    hmp qs "migrate \"exec:cat > /tmp/qemu.state\""
    qemu_wait_migrated qs
    hmp qs "quit"
    wait
    t1=$(now)
    : >/tmp/qr.console
    qemu_start qr -incoming "exec:cat /tmp/qemu.state"
    # Loaded once it is plainly paused (no longer "paused (inmigrate)").
    qemu_wait_status qr "VM status: paused.?$"
    hmp qr "cont"
    t2=$(now)
    hmp qr "info status"
    : >/tmp/qd.console
    qemu_start qd -incoming tcp:127.0.0.1:4444
    # It listens once its monitor answers (QEMU binds -incoming before that).
    qemu_wait_status qd "inmigrate"
    hmp qr "migrate_set_parameter downtime-limit 50"
    hmp qr "migrate -d tcp:127.0.0.1:4444"
    qemu_wait_migrated qr
    down=$(sed -n 's/^downtime: \([0-9]*\) ms.*/\1/p' /tmp/qr.log | tail -n 1)
    total=$(sed -n 's/^total time: \([0-9]*\) ms.*/\1/p' /tmp/qr.log | tail -n 1)
    echo "LAB-BENCH vmm=qemu-moves run=$run save_s=$(secs $t0 $t1) restore_s=$(secs $t1 $t2) mig_s=$(awk -v t="$total" 'BEGIN { printf "%.2f", t / 1000 }') downtime_ms=$down"
    check "bench-qemu-moves-$run-migrated" grep -q "Migration status: completed" /tmp/qr.log
    hmp qr "quit"
    check "bench-qemu-moves-$run-ticks-there" wait_for /tmp/qd.console "\.\.\." 60
    hmp qd "quit"
    wait
}
for run in 1 2; do
    nestvm_moves $run
    qemu_moves $run
done
