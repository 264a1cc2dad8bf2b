//! The command lines of `supd` and `supctl`, defined once: the binaries parse
//! them, and supd's build script renders them as man pages and completions, so
//! `--help` and the manual cannot disagree.

pub mod supctl;
pub mod supd;
