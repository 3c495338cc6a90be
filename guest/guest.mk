# The test guest (guest/build.sh): included from the top-level Makefile.
#   make guest        build it (or find it in the cache); GUEST_OUT=DIR also links the files there
#   make guest-bootdisk  the bootable disk images of the guest (guest/bootdisk.sh, cached)
#   make guest-test   the walcheck unit tests and the end-to-end tests against the real guest
#   make guest-clean  remove the guest cache
#   make fshelper     build the file restore helper VM (guest/fshelper/build.sh)
GO ?= go
GUEST_OUT ?=
GUEST_CACHE = $${VMSHADOW_GUEST_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/vmshadow/guest}

.PHONY: guest guest-bootdisk guest-test guest-clean fshelper

guest:
	guest/build.sh $(GUEST_OUT)

guest-bootdisk:
	guest/bootdisk.sh

guest-test: guest
	$(GO) test -count=1 -timeout 20m ./internal/walcheck/ ./internal/guestvm/ ./guest/...

guest-clean:
	rm -rf "$(GUEST_CACHE)"

fshelper:
	guest/fshelper/build.sh
