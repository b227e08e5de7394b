#!/bin/sh
. /etc/hello/hello.conf
echo "${GREETING:-hello}, ${1:-world}! (version $HELLO_VERSION)"
cat /opt/hello/share/motd
