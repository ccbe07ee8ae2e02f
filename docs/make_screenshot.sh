#!/usr/bin/env bash
# Regenerate docs/report.png: the top of the 'cbst report' page of a finished 'cbst demo' folder,
# rendered by headless Chromium (Debian: apt-get install chromium) and shrunk to 3/5 of its size.
# The PNG stays full RGB: a 256-colour palette would replace the class colours of the legend and
# the gallery with near ones (traffic light and sign turned green).
#
#   docs/make_screenshot.sh [DEMO_DIR [REPORT_OPTION ...]]
#
# DEMO_DIR defaults to cbst-demo (run 'cbst demo' first); further arguments go to 'cbst report'
# (e.g. --source-metrics FILE.json for a demo folder that has no results.json yet).
# Runs from any folder; uses 'python -m cbst' of the Python on PATH (or $PYTHON).
set -euo pipefail
demo="${1:-cbst-demo}"
shift || true
docs="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "make_screenshot.sh: no Chromium found (apt-get install chromium)" >&2; exit 2; }

"$python" -m cbst report "$demo" --output "$demo/report.html" --overwrite "$@"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --hide-scrollbars --window-size=1400,2300 \
    --screenshot="$work/page.png" "file://$(cd "$demo" && pwd)/report.html" 2>/dev/null
"$python" - "$work/page.png" "$docs/report.png" <<'PY'
import sys
from PIL import Image

page = Image.open(sys.argv[1]).convert("RGB")
small = page.resize((page.width * 3 // 5, page.height * 3 // 5), Image.LANCZOS)
small.save(sys.argv[2], optimize=True)  # RGB: every class colour exact
print(f"{sys.argv[2]}: {small.width}x{small.height}")
PY
