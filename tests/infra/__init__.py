"""Integration-test infrastructure: real registries, a token issuer, a fault-injecting proxy, test tarballs.

Independent of imgci (stdlib, requests, cryptography, PyJWT only) so it can check imgci from the outside.
See README.md in this directory for usage.
"""
