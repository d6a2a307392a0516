#!/usr/bin/env bash
# Installs Debian's headless-capable `chromium` when /usr/bin/chromium is missing (idempotent).
# Used only by the report's browser test; without it that test skips with a reason.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then
  echo "warning: not root; install chromium yourself (apt-get install chromium); the browser test will skip" >&2
  exit 0
fi
echo "installing Debian package chromium (headless browser for the report test)"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium fonts-dejavu-core >/dev/null) \
  || echo "warning: could not install chromium; the report browser test will skip" >&2
exit 0
