#!/bin/bash
# The systemd files as systemd itself reads them: `systemd-analyze verify` on
# the unit (ExecStart pointed at the built mtnlgd), systemd-sysusers creating
# the account in a scratch root, systemd-tmpfiles creating the directories
# there as that account; the unit names mtnlgd and its config where
# `meson install` puts them for the build's prefix.
# usage: test_systemd_files.sh SOURCE_ROOT MTNLGD UNIT SBINDIR SYSCONFDIR
set -euo pipefail
src=$1 mtnlgd=$(realpath "$2") unit=$3 sbindir=$4 sysconfdir=$5
if ! command -v systemd-analyze >/dev/null; then
  echo "SKIP: systemd-analyze not installed"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! grep -q "^ExecStart=$sbindir/mtnlgd --config $sysconfdir/mtnlg/mtnlgd.conf\$" "$unit" ||
  ! grep -q "^ReadOnlyPaths=$sysconfdir/mtnlg\$" "$unit"; then
  echo "FAIL test_unit_names_the_installed_paths: want $sbindir/mtnlgd and $sysconfdir/mtnlg in:"
  grep -E '^(ExecStart|ReadOnlyPaths)=' "$unit"
  exit 1
fi
echo "ok test_unit_names_the_installed_paths ($sbindir, $sysconfdir)"
sed "s|^ExecStart=$sbindir/mtnlgd|ExecStart=$mtnlgd|" "$unit" >"$tmp/mtnlgd.service"
out=$(systemd-analyze verify "$tmp/mtnlgd.service" 2>&1) || {
  echo "FAIL test_unit_verifies: $out"
  exit 1
}
if [[ -n $out ]]; then
  echo "FAIL test_unit_verifies_without_warnings: $out"
  exit 1
fi
echo "ok test_unit_verifies_without_warnings"
grep -q '^Type=notify' "$tmp/mtnlgd.service" && grep -q '^WatchdogSec=' "$tmp/mtnlgd.service" &&
  grep -q '^DeviceAllow=char-nvidiactl' "$tmp/mtnlgd.service" && ! grep -q '^PrivateDevices=yes' "$tmp/mtnlgd.service" &&
  ! grep '^DeviceAllow=' "$tmp/mtnlgd.service" | grep -vq '^DeviceAllow=char-' ||
  { echo "FAIL test_unit_is_notify_with_watchdog_and_gpu_access"; exit 1; }
echo "ok test_unit_is_notify_with_watchdog_and_gpu_access"
root=$tmp/root
mkdir -p "$root/etc"
systemd-sysusers --root="$root" "$src/systemd/mtnlg.sysusers"
grep -q '^mtnlg:' "$root/etc/passwd" || { echo "FAIL test_sysusers_creates_mtnlg"; exit 1; }
echo "ok test_sysusers_creates_mtnlg"
systemd-tmpfiles --root="$root" --create "$src/systemd/mtnlg.tmpfiles"
for d in var/lib/mtnlg srv/mtnlg/checkpoints srv/mtnlg/data etc/mtnlg/jobs; do
  [[ -d $root/$d ]] || { echo "FAIL test_tmpfiles_creates_directories: $d missing"; exit 1; }
done
echo "ok test_tmpfiles_creates_directories"
