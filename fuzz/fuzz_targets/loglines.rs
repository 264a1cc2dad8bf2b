//! The log line splitter: every byte of output comes out, in order, in lines
//! no longer than max_line, whatever the reads look like.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sup_core::logs::split_lines;

fuzz_target!(|data: &[u8]| {
    let Some((&head, data)) = data.split_first() else { return };
    let max_line = usize::from(head % 64) + 1;
    let cut = usize::from(head / 64) * 7 + 1;
    let mut partial = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for piece in data.chunks(cut) {
        split_lines(&mut partial, piece, max_line, |l, at| {
            assert!(l.len() <= max_line);
            assert!(!l.contains(&b'\n'));
            if let Some(at) = at {
                assert_eq!(&piece[at..at + l.len()], l);
            }
            lines.push(l.to_vec());
        });
    }
    // Nothing lost, nothing invented: the bytes without newlines are the lines' bytes plus what is left.
    let kept: Vec<u8> = lines.concat().into_iter().chain(partial.iter().copied()).collect();
    let input: Vec<u8> = data.iter().copied().filter(|&b| b != b'\n').collect();
    assert_eq!(kept, input);
});
