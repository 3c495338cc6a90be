package guestvm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

var (
	accelMu     sync.Mutex
	accelCached string
)

// DetectAccel says which accelerator boots the guest here: "kvm" only when
// /dev/kvm opens and a probe boot under KVM reaches the ready marker (nested
// KVM modules exist that cannot run a stock kernel), "tcg" otherwise. The
// environment variable VMSHADOW_ACCEL=tcg|kvm decides without probing. The
// probe result is kept next to the guest's files, per host boot, so a machine
// probes once.
func DetectAccel(ctx context.Context, g *Guest) (string, error) {
	switch a := os.Getenv("VMSHADOW_ACCEL"); a {
	case "tcg", "kvm":
		return a, nil
	case "":
	default:
		return "", fmt.Errorf("VMSHADOW_ACCEL=%q: use tcg or kvm", a)
	}
	accelMu.Lock()
	defer accelMu.Unlock()
	if accelCached != "" {
		return accelCached, nil
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		accelCached = "tcg"
		return accelCached, nil
	}
	f.Close()
	bootID, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	cache := filepath.Join(g.Dir, "accel-"+strings.TrimSpace(string(bootID)))
	if b, err := os.ReadFile(cache); err == nil {
		if a := strings.TrimSpace(string(b)); a == "kvm" || a == "tcg" {
			accelCached = a
			return a, nil
		}
	}
	a, err := probeKVM(ctx, g)
	if err != nil {
		return "", err
	}
	accelCached = a
	_ = os.WriteFile(cache, []byte(a+"\n"), 0o644)
	return a, nil
}

// probeKVM boots the guest once under KVM, without disks, agent or workload.
// Only a cancelled ctx is an error.
func probeKVM(ctx context.Context, g *Guest) (string, error) {
	dir, err := os.MkdirTemp("", "vmshadow-kvm-probe-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	vm, err := Start(ctx, g, Options{Dir: dir, Accel: "kvm", BootTimeout: time.Minute,
		KernelArgs: []string{"vmshadow.noagent=1", "vmshadow.noapp=1"}})
	if err != nil {
		if ctx.Err() != nil {
			return "", fmt.Errorf("probe KVM: %w", ctx.Err())
		}
		return "tcg", nil
	}
	vm.Kill()
	return "kvm", nil
}
