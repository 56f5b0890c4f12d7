# virtio devices between L1 and a Debian L2 (nesting off: these are the
# devices a VM that hosts VMs uses, tested one level down). The disk image
# and the nonce in it come from the test on the host.
N=/nestvm/nestvm
mods=/lib/modules/$(uname -r)
for m in tun llc stp bridge; do
    insmod "$mods/$m.ko" || say "insmod $m failed"
done
NONCE=$(cat /lab/nonce)
cp /lab/disk.img /tmp/disk.img
brctl addbr br0
ip addr add 10.0.0.1/24 dev br0
ip link set br0 up
mkdir -p /srv
dd if=/dev/urandom of=/srv/blob bs=1M count=10 2>/dev/null
DOWN=$(md5sum /srv/blob | cut -d' ' -f1)
httpd -p 8080 -h /srv
FORGED=5256deadbeef
# fdb_has MAC: the bridge learned MAC (hex, no colons) on one of its ports,
# i.e. a frame from it reached L1.
fdb_has() { [ ${#1} = 12 ] && od -An -tx1 -v /sys/class/net/br0/brforward | tr -d ' \n' | grep -q "$1"; }
fdb_lacks() { [ ${#1} = 12 ] && ! fdb_has "$1"; }

# nestvm creates tap0 (L1 runs it as root); bridge it once it exists.
attach_tap() {
    n=0
    until [ -d /sys/class/net/tap0 ] || [ $n -ge 120 ]; do
        sleep 1
        n=$((n + 1))
    done
    brctl addif br0 tap0
    ip link set tap0 up
}
KERNEL="--kernel /next/vmlinuz --initrd /next/initrd"
CMD="console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.script=l2-devices lab.nonce=$NONCE"

vm dev1 900 $KERNEL --memory 256M --nested off --disk path=/tmp/disk.img \
    --net tap=tap0 --cmdline "$CMD lab.devmode=first" &
attach_tap
require dev-tap-created test -d /sys/class/net/tap0
wait_for /tmp/dev1.log "l2 serving" 600
wget -q -O /tmp/up http://10.0.0.2:8080/up
touch /srv/fetched
check dev-down-10mib-intact [ "$(value dev1 down-md5)" = "$DOWN" ]
check dev-down-10mib-size [ "$(value dev1 down-size)" = 10485760 ]
check dev-up-10mib-intact [ "$(md5sum /tmp/up | cut -d' ' -f1)" = "$(value dev1 up-md5)" ]
wait_for /tmp/dev1.log "forged-sent" 300
check dev-own-frames-arrive fdb_has "$(value dev1 own-mac)"
check dev-spoof-off-frames-never-arrive fdb_lacks $FORGED
touch /srv/checked-first
wait
check dev-poweroff-exit-0 rc_is dev1 0
check dev-spoofed-frames-counted between 1 1000000 "$(value dev1 tx_spoofed_dropped)"
check dev-image-has-l2-file grep -q "written by L2 $NONCE" /tmp/disk.img

vm dev2 900 $KERNEL --memory 256M --nested off --disk path=/tmp/disk.img,readonly=on \
    --net tap=tap0,mac_spoofing=on --cmdline "$CMD lab.devmode=second" &
attach_tap
wait_for /tmp/dev2.log "forged-sent" 600
check dev-spoof-on-frames-arrive fdb_has $FORGED
touch /srv/checked-second
wait
check dev2-exit-0 rc_is dev2 0
check dev2-nothing-dropped [ "$(value dev2 tx_spoofed_dropped)" = 0 ]

# vsock: Linux's driver in L2 against nestvm's device, each side opening a
# connection. L1's listener for the guest is there before the VM starts;
# L1 connects once the guest says it listens.
(/nestvm/lab-vsock host-serve /tmp/vs.sock_5678 >/tmp/host-serve.log 2>&1; echo $? >/tmp/host-serve.rc) &
n=0
until [ -S /tmp/vs.sock_5678 ] || [ $n -ge 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
# Quiet (L2's console to its log only), so that L1's own check lines are
# not interleaved with L2's on the console; L2's checks are shown after.
vm_quiet vs 900 $KERNEL --memory 256M --nested off --vsock cid=3,socket=/tmp/vs.sock \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.script=l2-vsock" &
wait_for /tmp/vs.log "vsock listening" 600
/nestvm/lab-vsock host-connect /tmp/vs.sock 1234 from-host >/tmp/host-connect.log 2>&1
check vs-host-gets-ok grep -q "^OK [0-9]" /tmp/host-connect.log
check vs-host-to-guest grep -qx "reply: guest got: from-host" /tmp/host-connect.log
wait
grep "LAB-CHECK\|LAB-L2: vsock" /tmp/vs.log
check vs-exit-0 rc_is vs 0
check vs-host-served-guest [ "$(cat /tmp/host-serve.rc)" = 0 ]

# The reference's Invoke-Command and Copy-VMFile: a managed VM's guest runs
# Debian's qemu-ga on vsock; L1 runs commands in it and copies a file in
# and out, with no console typing. Its network is `--net user` (passt):
# passt takes its addresses from the host's interface with the default
# route, and refuses one without carrier (as br0 is once its TAPs are
# gone): L1, a lab with no outside network, routes through a bridge of
# its own that never has ports (a new bridge has carrier).
ip link set lo up
brctl addbr br1
ip addr add 10.1.0.1/24 dev br1
ip link set br1 up
ip route add default via 10.1.0.254 dev br1
NONCE=$(cat /lab/nonce)
$N vm new ga --kernel /next/vmlinuz --initrd /next/initrd --memory 256M --nested off \
    --vsock cid=5 --net user,hostfwd=tcp:18080-:8080 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lab.level=2 lab.script=l2-agent lab.cid=5"
$N vm start ga
# The agent answers once it listens (a refused connection is retried; the
# guest boots first).
n=0
until $N vm exec ga -- /bin/true 2>/tmp/ga-wait.err || [ $n -ge 300 ]; do
    sleep 1
    n=$((n + 1))
done
check ga-agent-answers $N vm exec ga -- /bin/true
check ga-status-says-agent-answers sh -c "$N status | grep -q 'guest agent answers'"
$N vm exec ga -- /bin/sh -c "echo marker-$NONCE; echo to-stderr >&2; exit 7" >/tmp/ga.out 2>/tmp/ga.err
echo $? >/tmp/ga.rc
check ga-exec-stdout grep -qx "marker-$NONCE" /tmp/ga.out
check ga-exec-stderr grep -qx "to-stderr" /tmp/ga.err
check ga-exec-exit-code [ "$(cat /tmp/ga.rc)" = 7 ]
dd if=/dev/urandom of=/tmp/payload bs=1k count=3000 2>/dev/null
SUM=$(md5sum </tmp/payload | cut -d' ' -f1)
check ga-cp-in $N vm cp /tmp/payload ga:/tmp/payload
check ga-cp-in-intact [ "$($N vm exec ga -- /bin/sh -c 'md5sum </tmp/payload' | cut -d' ' -f1)" = "$SUM" ]
check ga-cp-out $N vm cp ga:/tmp/payload /tmp/payload.back
check ga-cp-out-intact [ "$(md5sum </tmp/payload.back | cut -d' ' -f1)" = "$SUM" ]
# Network without root: an address by DHCP from passt, a file from L1's
# HTTP server (passt maps the gateway's address to the host), and L1
# reaching a server in the guest through the port forward.
$N vm exec ga -- /bin/sh /lab/l2-usernet.sh >/tmp/un.lease 2>&1
echo $? >/tmp/un.rc
cat /tmp/un.lease
check un-dhcp-lease [ "$(cat /tmp/un.rc)" = 0 ] || {
    say "no lease: udhcpc's log, then the VMM's (passt's lines among them)"
    $N vm exec ga -- cat /tmp/udhcpc.log
    tail -n 20 /var/lib/nestvm/vms/ga/vmm.log
}
ROUTER=$(sed -n 's/.*router=\([0-9.]*\).*/\1/p' /tmp/un.lease)
check un-fetch-from-l1 $N vm exec ga -- wget -q -O /tmp/blob "http://$ROUTER:8080/blob"
check un-fetched-intact [ "$($N vm exec ga -- /bin/sh -c 'md5sum </tmp/blob' | cut -d' ' -f1)" = "$DOWN" ]
$N vm exec ga -- /bin/sh -c "mkdir -p /www && echo served-$NONCE >/www/hello && httpd -p 8080 -h /www"
n=0
until wget -q -O /tmp/fwd http://127.0.0.1:18080/hello 2>/dev/null || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
check un-port-forward-reaches-guest grep -qx "served-$NONCE" /tmp/fwd
$N vm exec ga --port 999 -- /bin/true 2>/tmp/ga-noport.err
check ga-no-agent-says-how grep -q "qemu-guest-agent" /tmp/ga-noport.err
$N vm kill ga
