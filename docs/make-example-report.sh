#!/usr/bin/env bash
# Re-makes docs/example-report.html and docs/report-screenshot.png from the README's first command, so that
# both show what today's code writes (run after a change to the report or the scan document's schema).
#   docs/make-example-report.sh            # needs bdscan installed and Chromium (Debian: apt-get install chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the README's command verbatim, in a folder that looks like the repository root (the samples linked in), so the
# report's paths and the repair command it suggests are the ones a user sees
ln -s "$PWD/sample_models" "$work/sample_models"
status=0
demo=$(python -c "from bdscan.lab.samples import DEMO; print(DEMO.file)")
(cd "$work" && bdscan scan "sample_models/$demo" --out scan-out --report report.html --quiet) || status=$?
[ "$status" -eq 1 ] || { echo "expected exit 1 (backdoor suspected), got $status" >&2; exit 1; }
cp "$work/report.html" docs/example-report.html.tmp && mv docs/example-report.html.tmp docs/example-report.html
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no Chromium found: wrote docs/example-report.html only" >&2; exit 0; }
# headless flags as this project's CI uses them (no background networking: the machine has no internet)
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
    --window-size=1200,900 --screenshot="$work/shot.png" "file://$PWD/docs/example-report.html" >/dev/null 2>&1
cp "$work/shot.png" docs/report-screenshot.png.tmp && mv docs/report-screenshot.png.tmp docs/report-screenshot.png
echo "wrote docs/example-report.html and docs/report-screenshot.png"
