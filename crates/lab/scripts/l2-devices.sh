# In L2: the virtio disk and network adapter nestvm gives this guest.
# lab.devmode=first: read the file the test wrote into the disk image, write
#   one back, move 10 MiB each way over the network, then send frames from a
#   forged source MAC. lab.devmode=second: the same disk read-only (the file
#   written in the first boot must be there) and forged frames again.
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net crc16 mbcache jbd2 crc32c_generic ext4; do
    insmod "$mods/$m.ko" 2>/dev/null || say "insmod $m failed"
done
MODE=$(arg devmode)
NONCE=$(arg nonce)
n=0
until [ -b /dev/vda ] && [ -d /sys/class/net/eth0 ] || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
check "l2dev-$MODE-has-disk" test -b /dev/vda
check "l2dev-$MODE-has-nic" test -d /sys/class/net/eth0
mkdir -p /mnt
if [ "$MODE" = first ]; then
    mount -t ext2 /dev/vda /mnt
    check l2dev-reads-host-file grep -q "written on the host $NONCE" /mnt/from-host.txt
    echo "written by L2 $NONCE" >/mnt/from-l2.txt
    sync
    check l2dev-umount umount /mnt
else
    check l2dev-ro-device [ "$(cat /sys/block/vda/ro)" = 1 ]
    mount -t ext2 -o ro /dev/vda /mnt
    check l2dev-file-persisted grep -q "written by L2 $NONCE" /mnt/from-l2.txt
    check l2dev-ro-write-refused sh -c "! dd if=/dev/zero of=/dev/vda bs=512 count=1 oflag=direct 2>/dev/null"
    umount /mnt
fi

ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
n=0
until ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1 || [ $n -ge 60 ]; do n=$((n + 1)); done
check "l2dev-$MODE-ping" ping -c 3 -W 5 10.0.0.1
if [ "$MODE" = first ]; then
    wget -q -O /tmp/blob http://10.0.0.1:8080/blob
    say "down-md5=$(md5sum /tmp/blob | cut -d' ' -f1) down-size=$(wc -c </tmp/blob)"
    mkdir -p /srv
    dd if=/dev/urandom of=/srv/up bs=1M count=10 2>/dev/null
    say "up-md5=$(md5sum /srv/up | cut -d' ' -f1)"
    httpd -p 8080 -h /srv
    say "l2 serving"
    # L1 fetches /srv/up, then publishes /srv/fetched on its side.
    n=0
    until wget -q -O /tmp/go http://10.0.0.1:8080/fetched 2>/dev/null || [ $n -ge 300 ]; do
        sleep 1
        n=$((n + 1))
    done
fi
OWN=$(tr -d : </sys/class/net/eth0/address)
say "own-mac=$OWN"
# Frames from a forged source MAC (as a guest bridged inside this VM sends).
ip link set eth0 down
ip link set eth0 address 52:56:de:ad:be:ef
ip link set eth0 up
ping -c 5 -W 1 10.0.0.1 >/dev/null 2>&1
say "forged-sent"
# L1 looks at its bridge's table of learned MACs meanwhile (which forgets
# this VM's MACs once it ends), and says when it is done by publishing
# /srv/checked-MODE. Back to the own MAC to hear it.
ip link set eth0 down
ip link set eth0 address "$(echo "$OWN" | sed 's/../&:/g; s/:$//')"
ip link set eth0 up
n=0
until wget -q -O /tmp/checked "http://10.0.0.1:8080/checked-$MODE" 2>/dev/null || [ $n -ge 300 ]; do
    sleep 1
    n=$((n + 1))
done
check "l2dev-$MODE-level-above-checked" test -f /tmp/checked
