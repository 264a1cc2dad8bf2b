//! sd_notify datagrams from workers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sup_core::notify::{parse, NotifyMsg};

fuzz_target!(|data: &[u8]| {
    for m in parse(data) {
        if let NotifyMsg::Status(s) = m {
            assert!(s.chars().count() <= 512, "STATUS is bounded");
        }
    }
});
