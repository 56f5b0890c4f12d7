# In L2: Debian's QEMU guest agent on nestvm's vsock device, for L1's
# `nestvm vm exec` and `vm cp`. It runs until L1 ends the VM. The network
# adapter's driver is loaded too: L1 sets the adapter up through the agent.
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport failover net_failover virtio_net; do
    insmod "$mods/$m.ko" 2>/dev/null || say "insmod $m failed"
done
n=0
until ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport 2>/dev/null | grep -q virtio || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
require l2ga-driver-bound sh -c 'ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -q virtio'
/nestvm/qemu-ga -m vsock-listen -p "$(arg cid):1234" -t /tmp -f /tmp/qga.pid >/tmp/qga.log 2>&1 &
say "agent started"
while :; do sleep 60; done
