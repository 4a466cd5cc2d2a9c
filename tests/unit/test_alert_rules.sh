#!/bin/bash
# etc/prometheus/mtnlg-alerts.yml as Prometheus reads it: `promtool check
# rules`, then `promtool test rules` on tests/unit/mtnlg-alerts.test.yml
# (each alert firing on synthetic series where it must, and silent where it
# must not: a stall fires, a long validation or a pause does not), and
# every mtnlg_ metric the rules name is one the daemon's /v1/metrics
# renders (daemon/control/metrics.c), so a renamed metric cannot leave an
# alert that never fires.
# usage: test_alert_rules.sh SOURCE_ROOT
set -uo pipefail
src=$1
promtool=$(command -v promtool || true)
if [[ -z $promtool ]]; then
  echo "SKIP: promtool not installed (Debian's prometheus package)"
  exit 77
fi
rules=$src/etc/prometheus/mtnlg-alerts.yml
fails=0
if out=$("$promtool" check rules "$rules" 2>&1); then
  echo "ok test_promtool_checks_the_rules: $(grep -o '[0-9]* rules found' <<<"$out")"
else
  echo "FAIL test_promtool_checks_the_rules: $out"
  fails=$((fails + 1))
fi
if out=$(cd "$src/tests/unit" && "$promtool" test rules mtnlg-alerts.test.yml 2>&1); then
  echo "ok test_each_alert_fires_where_it_must_and_not_elsewhere"
else
  echo "FAIL test_each_alert_fires_where_it_must_and_not_elsewhere: $out"
  fails=$((fails + 1))
fi
missing=()
for m in $(grep -v '^ *#' "$rules" | grep -o 'mtnlg_[a-z_]*' | sort -u); do
  grep -q "\"$m\"" "$src/daemon/control/metrics.c" || missing+=("$m")
done
if ((${#missing[@]})); then
  echo "FAIL test_the_rules_name_metrics_the_daemon_renders: not in metrics.c: ${missing[*]}"
  fails=$((fails + 1))
else
  echo "ok test_the_rules_name_metrics_the_daemon_renders"
fi
exit $((fails > 0))
