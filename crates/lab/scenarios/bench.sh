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
