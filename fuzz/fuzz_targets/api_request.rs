//! The control API's request parsing, as a hostile client drives it: a
//! request head's first line, the route it picks, and the query parsed into
//! a typed request. Whatever the bytes, each step answers a value or a
//! refusal with an HTTP status of 400, 404 or 405; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_vmm::api::{parse_head, parse_query, route, Request};

fuzz_target!(|data: &[u8]| {
    let Ok((method, path)) = parse_head(data) else {
        return;
    };
    let action = match route(&method, &path) {
        Ok(a) => a,
        Err(r) => {
            assert!(matches!(r.status, 404 | 405), "{r:?}");
            return;
        }
    };
    match Request::parse(action, &parse_query(&path)) {
        Ok(r) => {
            let _ = format!("{r:?}");
        }
        Err(r) => assert_eq!(r.status, 400, "{r:?}"),
    }
});
