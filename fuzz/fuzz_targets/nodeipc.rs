//! The Node IPC channel reader: any byte stream, cut anywhere, splits into
//! bounded lines, and every line parses without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sup_core::nodeipc::{choose, parse, Bound, Incoming, LineSplitter, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = usize::from(cut).max(1);
    let mut s = LineSplitter::default();
    let socks = [Bound::Tcp(([0, 0, 0, 0], 3000).into()), Bound::Path("/run/a.sock".into()), Bound::Other];
    for piece in data.chunks(cut) {
        for line in s.push(piece) {
            assert!(line.len() <= MAX_LINE);
            assert!(!line.contains(&b'\n'));
            if let Incoming::QueryServer(q) = parse(&line) {
                if let Some(i) = choose(&q, &socks) {
                    assert!(i < socks.len());
                }
            }
        }
    }
});
