# In L2, for the benchmarks: sequential disk write and read, and a TCP
# download, with the same commands whichever VMM (nestvm or QEMU) runs this
# guest. Prints one "BENCH-L2 key=value..." line; rates in MiB/s.
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net; do
    insmod "$mods/$m.ko" 2>/dev/null || say "insmod $m failed"
done
n=0
until [ -b /dev/vda ] && [ -d /sys/class/net/eth0 ] || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
now() { cut -d' ' -f1 /proc/uptime; }
rate() { awk -v a="$1" -v b="$2" -v mib="$3" 'BEGIN { d = b - a; if (d <= 0) d = 0.01; printf "%.1f", mib / d }'; }
t0=$(now)
dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct conv=fsync 2>/dev/null
t1=$(now)
W=$(rate "$t0" "$t1" 64)
t0=$(now)
dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct 2>/dev/null
t1=$(now)
R=$(rate "$t0" "$t1" 64)
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
n=0
until ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1 || [ $n -ge 60 ]; do n=$((n + 1)); done
t0=$(now)
wget -q -O /dev/null http://10.0.0.1:8080/blob
t1=$(now)
N=$(rate "$t0" "$t1" 32)
say "BENCH-L2 write_mibs=$W read_mibs=$R net_mibs=$N"
