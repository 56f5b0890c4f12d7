//! The control API's request parsing, as a hostile client drives it: a
//! request head's first line and secret header, the route it picks, and
//! the query parsed into a typed request. Whatever the bytes, each step answers a value or a
//! refusal with an HTTP status of 400, 404 or 405; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_vmm::api::{parse_head, parse_query, route, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(head) = parse_head(data) else {
        return;
    };
    let (method, path) = (head.method, head.target);
    let action = match route(&method, &path) {
        Ok(a) => a,
        Err(r) => {
            assert!(matches!(r.status, 404 | 405), "{r:?}");
            return;
        }
    };
    match Request::parse(action, &parse_query(&path), head.secret.as_deref()) {
        Ok(r) => {
            let _ = format!("{r:?}");
        }
        Err(r) => assert_eq!(r.status, 400, "{r:?}"),
    }
});
