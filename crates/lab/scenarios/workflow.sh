# The reference document's workflow, driven only from L1's shell with no
# console typing: a Debian system built by `nestvm image debian` (on the
# host, cached; it is L1's /dev/vda, its kernel and initrd under /lab) ->
# vm new --image -> vm enable-nested --yes -> vm start -> vm exec runs a
# nested VM inside the guest (nestvm, copied in with vm cp) whose marker
# and exit code come back; vm cp a file in and out; on `--net user` the
# guest fetches a file from L1's HTTP server and L1 reaches the guest's
# server through a port forward; vm stop shuts systemd down cleanly. All
# of it as an unprivileged user of L1, `lab` (uid 1000), who may use
# /dev/kvm and the disk; only the set-up below is root's. $N runs nestvm
# as that user through busybox's su (its arguments passed as they are).
echo "lab:x:1000:1000:lab:/home/lab:/bin/sh" >>/etc/passwd
echo "lab:x:1000:" >>/etc/group
mkdir -p /home/lab
chown 1000:1000 /home/lab
export NESTVM_STATE_DIR=/home/lab/state
mkdir -p /usr/local/bin
cat >/usr/local/bin/nestvm-as-lab <<'SH'
#!/bin/sh
# (POSIXLY_CORRECT: su's options end at the user, so none of nestvm's is
# taken for su's.)
POSIXLY_CORRECT=1 exec /bin/busybox su -s /bin/sh -c 'exec env -u POSIXLY_CORRECT HOME=/home/lab PATH="$LAB_PATH" NESTVM_STATE_DIR=/home/lab/state /nestvm/nestvm "$@"' lab nestvm "$@"
SH
chmod 0755 /usr/local/bin/nestvm-as-lab
export LAB_PATH="$PATH"
N=/usr/local/bin/nestvm-as-lab
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk tun llc stp bridge; do
    insmod "$mods/$m.ko" 2>/dev/null || say "insmod $m failed"
done
NONCE=$(cat /lab/nonce)
n=0
until [ -b /dev/vda ] || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
require wf-l1-has-the-image test -b /dev/vda
chown 1000:1000 /dev/vda
chmod 0666 /dev/kvm
# `--image FILE` takes FILE.vmlinuz and FILE.initrd beside FILE: here FILE
# is a link to the block device (a disk may be one).
ln -s /dev/vda /tmp/debian.img
cp /lab/debian.img.vmlinuz /tmp/debian.img.vmlinuz
cp /lab/debian.img.initrd /tmp/debian.img.initrd
# passt copies the host's addresses from the interface with the default
# route: L1 (no outside network) gets one on a bridge of its own.
ip link set lo up
brctl addbr br0
ip addr add 10.0.0.1/24 dev br0
ip link set br0 up
ip route add default via 10.0.0.254 dev br0
mkdir -p /srv
echo "from-l1-$NONCE" >/srv/hello
httpd -p 8080 -h /srv

$N vm new deb --image /tmp/debian.img --memory 1536M --nested off \
    --net user,hostfwd=tcp:18080-:8080 >/tmp/new.out 2>&1
cat /tmp/new.out
require wf-vm-new grep -q "created VM 'deb'" /tmp/new.out
require wf-enable-nested $N vm enable-nested deb --yes --keep-memory
check wf-nested-on sh -c "$N vm show deb | grep -q 'nested.*on'"
require wf-vm-start $N vm start deb
check wf-vmm-runs-as-the-user grep -q "^Uid:[[:space:]]*1000[[:space:]]" /proc/"$(cat $NESTVM_STATE_DIR/vms/deb/vmm.pid)"/status
# systemd boots and starts the agent; a refused connection is retried
# (each try waits up to 10 s for an answer), within a bound of 15 minutes.
start=$(date +%s)
until $N vm exec deb --timeout 20 -- /bin/true 2>/dev/null || [ $(($(date +%s) - start)) -ge 900 ]; do
    sleep 2
done
n=$(($(date +%s) - start))
if ! $N vm exec deb -- /bin/true >/dev/null 2>&1; then
    say "no agent: the end of the guest's console"
    tail -n 60 $NESTVM_STATE_DIR/vms/deb/console.log
fi
require wf-agent-answers $N vm exec deb -- /bin/true
say "the guest's agent answered after ${n}s"
check wf-status-says-agent-answers sh -c "$N status | grep -q 'guest agent answers'"
check wf-guest-sees-svm $N vm exec deb -- grep -q svm /proc/cpuinfo

# A VM inside the guest: nestvm and a tiny guest copied in, run there.
check wf-cp-nestvm-in $N vm cp /nestvm/nestvm deb:/root/nestvm
check wf-cp-guest-in $N vm cp /guests/hello-poweroff.elf deb:/root/tiny.elf
$N vm exec deb -- chmod +x /root/nestvm
start=$(date +%s)
until $N vm exec deb -- test -c /dev/kvm || [ $(($(date +%s) - start)) -ge 120 ]; do
    sleep 2
done
check wf-guest-has-kvm $N vm exec deb -- test -c /dev/kvm
$N vm exec deb --timeout 300 -- /root/nestvm run --kernel /root/tiny.elf --memory 16M >/tmp/inner.out 2>/tmp/inner.err
echo $? >/tmp/inner.rc
# (The tiny guest's line has no newline of its own.)
cat /tmp/inner.out /tmp/inner.err
echo
check wf-nested-vm-marker grep -q "LAB-TINY: powering off" /tmp/inner.out
check wf-nested-vm-exit-code [ "$(cat /tmp/inner.rc)" = 0 ]

# Files both ways.
dd if=/dev/urandom of=/tmp/payload bs=1k count=2000 2>/dev/null
SUM=$(md5sum </tmp/payload | cut -d' ' -f1)
check wf-cp-in $N vm cp /tmp/payload deb:/root/payload
check wf-cp-in-intact [ "$($N vm exec deb -- md5sum /root/payload | cut -d' ' -f1)" = "$SUM" ]
check wf-cp-out $N vm cp deb:/root/payload /tmp/payload.back
check wf-cp-out-intact [ "$(md5sum </tmp/payload.back | cut -d' ' -f1)" = "$SUM" ]

# The network, without root on the guest's side: systemd-networkd takes
# passt's lease; the gateway's address is the host's.
start=$(date +%s)
until $N vm exec deb -- busybox wget -q -O /root/hello http://10.0.0.254:8080/hello 2>/dev/null || [ $(($(date +%s) - start)) -ge 300 ]; do
    sleep 2
done
check wf-guest-fetches-from-l1 [ "$($N vm exec deb -- cat /root/hello)" = "from-l1-$NONCE" ]
$N vm exec deb -- sh -c "mkdir -p /root/www && echo from-guest-$NONCE >/root/www/index.html && busybox httpd -p 8080 -h /root/www"
n=0
until wget -q -O /tmp/fwd http://127.0.0.1:18080/index.html 2>/dev/null || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
check wf-l1-reaches-guest-by-port-forward grep -qx "from-guest-$NONCE" /tmp/fwd

# ACPI power button: systemd shuts the guest down and the VM is off.
$N vm stop deb --timeout 300 >/tmp/stop.out 2>&1
cat /tmp/stop.out
check wf-guest-powered-off grep -q "the guest powered off" /tmp/stop.out
check wf-vm-off sh -c "$N vm list | grep deb | grep -q Off"
