//! Renders the man pages of supd and supctl (one per supctl command, as git
//! does) and supctl's completions for bash, zsh and fish from the clap
//! definitions in sup-cli, so the manual always matches `--help`.
//!
//! The files go to `sup-assets/` beside the binaries (`target/release/sup-assets`
//! for a release build), where the Debian package (`cargo deb -p supd`) and
//! `scripts/install.sh` take them from. Man pages are gzipped, as Debian wants.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| std::io::Error::other("OUT_DIR unset"))?);
    // OUT_DIR is <target>/[<triple>/]<profile>/build/supd-<hash>/out.
    let profile_dir = out.ancestors().nth(3).ok_or_else(|| std::io::Error::other("unexpected OUT_DIR"))?;
    let assets = profile_dir.join("sup-assets");
    let man = assets.join("man");
    let completions = assets.join("completions");
    for d in [&man, &completions] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    let supd = sup_cli::supd::Args::command();
    let supctl = sup_cli::supctl::Cli::command();
    for cmd in [supd, supctl.clone()] {
        pages(cmd, &man)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut supctl.clone(), "supctl", &completions)?;
    }
    Ok(())
}

/// Writes NAME.1.gz for a command and, recursively, NAME-SUB.1.gz for each subcommand.
fn pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    write_page(&cmd, dir)
}

fn write_page(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(format!("sup {}", env!("CARGO_PKG_VERSION")))
        .manual("sup manual")
        .render(&mut roff)?;
    let file = std::fs::File::create(dir.join(format!("{name}.1.gz")))?;
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    gz.write_all(&roff)?;
    gz.finish()?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_page(sub, dir)?;
    }
    Ok(())
}
