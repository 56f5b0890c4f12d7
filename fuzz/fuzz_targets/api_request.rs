//! The control API's request parsing, as a hostile client drives it: a
//! request head's first line and the headers it reads (secret,
//! Content-Length), the route it picks, the query parsed into a typed
//! request — for the controller, or for the guest thread, whose exec body
//! (the bytes after the head) is parsed too. Whatever the bytes, each step
//! answers a value or a refusal with an HTTP status of 400, 404, 405, 411
//! or 413; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nestvm_vmm::api::{parse_head, parse_query, route, ExecRequest, GuestCall, Request};

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
    let query = parse_query(&path);
    if action.is_guest() {
        match GuestCall::parse(action, &query, head.content_length) {
            Ok(c) => {
                let _ = format!("{c:?}");
            }
            Err(r) => assert!(matches!(r.status, 400 | 411 | 413), "{r:?}"),
        }
        let body = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(&[][..], |at| &data[at + 4..]);
        if let Err(r) = ExecRequest::from_body(body) {
            assert_eq!(r.status, 400, "{r:?}");
        }
        return;
    }
    match Request::parse(action, &query, head.secret.as_deref()) {
        Ok(r) => {
            let _ = format!("{r:?}");
        }
        Err(r) => assert_eq!(r.status, 400, "{r:?}"),
    }
});
