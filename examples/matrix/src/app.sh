#!/bin/sh
. /opt/app/flavour.env
echo "example app, ${FLAVOUR} flavour ($(cat /opt/app/BASE))"
