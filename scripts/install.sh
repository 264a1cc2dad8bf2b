#!/bin/sh
# Builds and installs supd, supctl and sup-demo, the systemd unit, man pages,
# shell completions and a starter configuration, on hosts without the Debian
# package (`cargo deb -p supd`, see docs/operations.md). Run from the
# repository root as root:
#   sudo sh scripts/install.sh
# PREFIX (default /usr/local) and DESTDIR are honoured.
set -eu
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
cargo build --release --locked -p supd -p supctl -p sup-demo
assets=target/release/sup-assets
install -d "$DESTDIR$PREFIX/bin" "$DESTDIR/etc/systemd/system" "$DESTDIR/etc/supd" "$DESTDIR$PREFIX/share/doc/sup" \
  "$DESTDIR$PREFIX/share/man/man1" "$DESTDIR$PREFIX/share/bash-completion/completions" \
  "$DESTDIR$PREFIX/share/zsh/site-functions" "$DESTDIR$PREFIX/share/fish/vendor_completions.d"
install -m 0755 target/release/supd target/release/supctl target/release/sup-demo "$DESTDIR$PREFIX/bin/"
# The same man pages and completions as the Debian package (rendered by crates/supd/build.rs).
install -m 0644 "$assets"/man/*.1.gz "$DESTDIR$PREFIX/share/man/man1/"
install -m 0644 "$assets/completions/supctl.bash" "$DESTDIR$PREFIX/share/bash-completion/completions/supctl"
install -m 0644 "$assets/completions/_supctl" "$DESTDIR$PREFIX/share/zsh/site-functions/_supctl"
install -m 0644 "$assets/completions/supctl.fish" "$DESTDIR$PREFIX/share/fish/vendor_completions.d/supctl.fish"
sed -e "s|/usr/bin/supd|$PREFIX/bin/supd|" -e "s|/usr/bin/supctl|$PREFIX/bin/supctl|" \
  -e "s|/usr/share/doc/supd/|$PREFIX/share/doc/sup/|" systemd/supd.service > "$DESTDIR/etc/systemd/system/supd.service"
chmod 0644 "$DESTDIR/etc/systemd/system/supd.service"
if [ ! -e "$DESTDIR/etc/supd/supervisor.toml" ]; then
  cat > "$DESTDIR/etc/supd/supervisor.toml" <<TOML
# /etc/supd/supervisor.toml: see $PREFIX/share/doc/sup/configuration.md
[supervisor]
control_socket = "/run/supd/control.sock"
run_dir = "/run/supd"
log_dir = "/var/log/supd"

[apps.demo]
command = ["$PREFIX/bin/sup-demo"]
instances = 2
listen = ["127.0.0.1:8080"]
ready = "notify"
TOML
fi
install -m 0644 docs/*.md "$DESTDIR$PREFIX/share/doc/sup/"
if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload || true
fi
echo "installed; now: systemctl enable --now supd"
