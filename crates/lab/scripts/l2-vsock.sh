# In L2: Linux's own vsock driver on nestvm's virtio-vsock device. This
# guest serves one line on its port 1234 (L1 connects through the device's
# socket), then connects to the host's port 5678 (L1 listens on
# <socket>_5678) and checks the answer.
mods=/lib/modules/$(uname -r)
for m in virtio_ring virtio virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    insmod "$mods/$m.ko" 2>/dev/null || say "insmod $m failed"
done
n=0
until grep -q vsock /proc/net/protocols 2>/dev/null && [ -d /sys/bus/virtio/drivers/vmw_vsock_virtio_transport ] || [ $n -ge 30 ]; do
    sleep 1
    n=$((n + 1))
done
require l2vs-driver-bound sh -c 'ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -q virtio'
/nestvm/lab-vsock serve 1234 >/tmp/serve.log 2>&1 &
server=$!
n=0
until grep -q "listening" /tmp/serve.log || [ $n -ge 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
say "vsock listening"
wait $server
check l2vs-served-host-client [ $? = 0 ]
reply=$(/nestvm/lab-vsock connect 2 5678 from-guest 2>&1)
say "vsock reply: $reply"
check l2vs-guest-to-host [ "$reply" = "reply: host got: from-guest" ]
