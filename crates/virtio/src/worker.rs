//! The event-loop side of a virtio device: one event-manager subscriber per
//! device waits on its queues' notification eventfds (signalled by KVM
//! ioeventfds, so a guest kick costs no exit to userspace) and on the
//! backend's own descriptor (a TAP, edge-triggered), and runs the device's
//! work on the loop's thread, never on a vCPU thread. A turn on a queue is
//! bounded; a device with work left signals the queue's eventfd itself
//! (`MmioDevice::queue_notified`), so the loop, level-triggered on it,
//! comes back to the queue after its other ready sources.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::mmio::MmioDevice;
use crate::Backend;

/// Token for the backend's descriptor (queue tokens are their indices).
const BACKEND: u32 = u32::MAX;

/// A device shared between the MMIO bus (vCPU threads) and its worker.
pub type SharedMmio<B> = Arc<Mutex<MmioDevice<B>>>;

/// Serves one device from the event loop.
pub struct Worker<B> {
    dev: SharedMmio<B>,
    notify: Vec<EventFd>,
    backend_fd: Option<RawFd>,
}

impl<B: Backend> Worker<B> {
    /// A worker for `dev`; clones its notification eventfds.
    pub fn new(dev: SharedMmio<B>) -> std::io::Result<Self> {
        let d = lock(&dev);
        let notify = d
            .notify_events()
            .iter()
            .map(|t| t.0.try_clone())
            .collect::<Result<Vec<_>, _>>()?;
        let backend_fd = d.backend().event_fd();
        drop(d);
        Ok(Self {
            dev,
            notify,
            backend_fd,
        })
    }
}

fn lock<B>(dev: &SharedMmio<B>) -> std::sync::MutexGuard<'_, MmioDevice<B>> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: Backend> MutEventSubscriber for Worker<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.notify.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {e:?}");
            }
        }
        if let Some(fd) = self.backend_fd {
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND, set)) {
                log::error!("virtio: cannot watch the backend: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            BACKEND => lock(&self.dev).backend_event(),
            i => {
                if let Some(evt) = self.notify.get(i as usize) {
                    let _ = evt.read();
                    lock(&self.dev).queue_notified(i as usize);
                }
            }
        }
    }
}
