//! The state file container from arbitrary bytes: a file is refused or
//! gives a payload, and never panics; any payload survives a round trip
//! through the container.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nestvm_snapshot::container;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    if let Ok(payload) = container::decode(p, data) {
        assert_eq!(payload.len() + 32, data.len(), "the payload is the rest");
        let again = container::encode(payload);
        assert_eq!(container::decode(p, &again).unwrap(), payload);
    }
    let file = container::encode(data);
    assert_eq!(container::decode(p, &file).unwrap(), data);
});
