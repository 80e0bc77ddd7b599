#!/bin/sh
# Files a step writes into a folder mounted from the host (the local runner's pipeline root) stay
# removable by the host user's group. Kubernetes replaces the entrypoint; nothing else is done here.
umask 0002
exec "$@"
