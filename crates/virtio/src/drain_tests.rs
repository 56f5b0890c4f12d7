//! Bounded queue drains: a turn serves at most its budget, the rest is
//! served on the loop's next turns without a guest notification, nothing is
//! lost, and a restored device looks at its queues once by itself.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use nestvm_devices::EventTrigger;

use super::*;
use crate::driver::{self, Buf, QueueDriver};
use crate::mmio::MmioDevice;
use crate::testing::memory;
use crate::worker::Worker;

const BUDGET: usize = 4;

/// A backend that serves its queue [`BUDGET`] chains a turn and records the
/// heads it saw, in order.
struct Budgeted {
    seen: Arc<Mutex<Vec<u16>>>,
    features: u64,
}

impl Backend for Budgeted {
    fn device_type(&self) -> u32 {
        42
    }
    fn kind(&self) -> &'static str {
        "budgeted"
    }
    fn describe(&self) -> String {
        "budgeted".into()
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn queue_sizes(&self) -> &[u16] {
        &[16]
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn activate(&mut self, _features: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn process_queue(&mut self, _q: usize, queues: &mut [Queue], mem: &Memory) -> Served {
        drain_queue_budget(&mut queues[0], mem, BUDGET, |chain| {
            self.seen.lock().unwrap().push(chain.head_index());
            1
        })
    }
}

struct Rig {
    dev: MmioDevice<Budgeted>,
    mem: Memory,
    q: QueueDriver,
    seen: Arc<Mutex<Vec<u16>>>,
}

fn rig(features: u64) -> Rig {
    let mem = memory();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = Budgeted {
        seen: seen.clone(),
        features,
    };
    let mut dev = MmioDevice::new(backend, mem.clone(), EventTrigger::new().unwrap()).unwrap();
    let q = QueueDriver::new(0x10000, 16);
    driver::start(&mut dev, features, std::slice::from_ref(&q));
    assert!(dev.is_active());
    let r = Rig { dev, mem, q, seen };
    // Activation kicks every queue, for buffers posted before it.
    assert!(r.kicked(), "activation hands the queue to the event loop");
    r
}

impl Rig {
    /// Posts `n` one-buffer chains; returns their heads.
    fn post(&mut self, n: usize) -> Vec<u16> {
        let buf = Buf {
            addr: 0x40000,
            len: 16,
            writable: true,
        };
        (0..n)
            .map(|_| self.q.add_chain(&self.mem, &[buf]))
            .collect()
    }

    /// Whether the queue's notification eventfd is signalled (and clears it).
    fn kicked(&self) -> bool {
        self.dev.notify_events()[0].0.read().is_ok()
    }
}

const BOTH: [u64; 2] = [
    features::VERSION_1,
    features::VERSION_1 | features::RING_EVENT_IDX,
];

#[test]
fn a_turn_serves_its_budget_and_re_arms_the_queue_for_the_rest() {
    for f in BOTH {
        let mut r = rig(f);
        let heads = r.post(10);
        r.dev.queue_notified(0);
        assert_eq!(r.q.take_used(&r.mem).len(), BUDGET, "one turn, one budget");
        assert!(r.kicked(), "re-armed itself");
        r.dev.queue_notified(0);
        assert_eq!(r.q.take_used(&r.mem).len(), BUDGET);
        assert!(r.kicked());
        r.dev.queue_notified(0);
        assert_eq!(r.q.take_used(&r.mem).len(), 2, "the rest");
        assert!(!r.kicked(), "nothing left: the guest's turn to notify");
        assert_eq!(*r.seen.lock().unwrap(), heads, "each once, in order");
    }
}

/// While a migration holds the VM a device serves nothing; what the
/// guest queued meanwhile is served once it is thawed.
#[test]
fn a_frozen_device_serves_nothing_until_thawed() {
    let mut r = rig(features::VERSION_1);
    r.dev.freeze();
    r.post(3);
    r.dev.queue_notified(0);
    assert!(r.q.take_used(&r.mem).is_empty(), "nothing while frozen");
    assert!(!r.kicked());
    r.dev.thaw();
    assert!(r.kicked(), "thawing re-arms the queue notified meanwhile");
    r.dev.queue_notified(0);
    assert_eq!(r.q.take_used(&r.mem).len(), 3);
    r.dev.thaw();
    assert!(!r.kicked(), "a second thaw does nothing");
}

#[test]
fn exactly_a_budget_leaves_nothing_to_re_arm() {
    for f in BOTH {
        let mut r = rig(f);
        r.post(BUDGET);
        r.dev.queue_notified(0);
        assert_eq!(r.q.take_used(&r.mem).len(), BUDGET);
        assert!(!r.kicked());
        // Notifications are back on: a later chain is served when notified.
        r.post(1);
        r.dev.queue_notified(0);
        assert_eq!(r.q.take_used(&r.mem).len(), 1);
    }
}

#[test]
fn the_worker_serves_the_rest_on_its_next_turns_without_a_new_notification() {
    let r = rig(features::VERSION_1 | features::RING_EVENT_IDX);
    let Rig {
        dev,
        mem,
        mut q,
        seen,
    } = r;
    let kick = dev.notify_events()[0].try_clone().unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut events = EventManager::<Worker<Budgeted>>::new().unwrap();
    events.add_subscriber(Worker::new(dev.clone()).unwrap());
    let buf = Buf {
        addr: 0x40000,
        len: 16,
        writable: true,
    };
    let mut heads: Vec<u16> = (0..10).map(|_| q.add_chain(&mem, &[buf])).collect();
    kick.0.write(1).unwrap(); // the guest's one notification
    let mut served = Vec::new();
    for _ in 0..3 {
        assert_eq!(events.run_with_timeout(0).unwrap(), 1, "the queue is ready");
        served.push(q.take_used(&mem).len());
        if served.len() == 1 {
            // More arrive meanwhile (notifications are off: no kick).
            heads.extend((0..3).map(|_| q.add_chain(&mem, &[buf])));
        }
    }
    assert_eq!(served, [BUDGET, BUDGET, BUDGET]);
    assert_eq!(events.run_with_timeout(0).unwrap(), 1);
    assert_eq!(q.take_used(&mem).len(), 1, "the last of the 13");
    assert_eq!(events.run_with_timeout(0).unwrap(), 0, "idle once drained");
    assert_eq!(*seen.lock().unwrap(), heads, "nothing lost, nothing twice");
}

#[test]
fn a_restored_device_looks_at_its_queues_once() {
    let mut r = rig(features::VERSION_1);
    r.post(10);
    r.dev.queue_notified(0);
    assert_eq!(r.q.take_used(&r.mem).len(), BUDGET);
    // Saved with work left and its re-arm not yet served.
    let snap = r.dev.snapshot();
    let backend = Budgeted {
        seen: r.seen.clone(),
        features: features::VERSION_1,
    };
    let mut dev =
        MmioDevice::restore(backend, r.mem.clone(), EventTrigger::new().unwrap(), &snap).unwrap();
    assert!(dev.notify_events()[0].0.read().is_ok(), "kicked at restore");
    dev.queue_notified(0);
    dev.queue_notified(0);
    assert_eq!(r.q.take_used(&r.mem).len(), 6, "the rest, served");
}
