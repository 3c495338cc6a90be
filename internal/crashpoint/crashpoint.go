// Package crashpoint is failure injection for tests of crash recovery and
// of faults in the middle of an operation:
//
//   - VMSHADOW_CRASH_AT=NAME: the process kills itself with SIGKILL when it
//     reaches the point NAME, exactly as an operator's kill -9 or an OOM
//     kill would, leaving whatever it had created behind;
//   - VMSHADOW_PAUSE_AT=NAME and VMSHADOW_PAUSE_FILE=PATH: at the point NAME
//     the process creates PATH and waits (at most ten minutes) until the
//     test removes it, so the test can inject a fault at that moment.
//
// Without these variables, Hit does nothing.
package crashpoint

import (
	"os"
	"sync"
	"syscall"
	"time"
)

var (
	crashAt   = os.Getenv("VMSHADOW_CRASH_AT")
	pauseAt   = os.Getenv("VMSHADOW_PAUSE_AT")
	pauseFile = os.Getenv("VMSHADOW_PAUSE_FILE")
	pauseOnce sync.Once
	resumed   = make(chan struct{})
)

// Hit kills or pauses the process if name is the requested point.
func Hit(name string) {
	if crashAt != "" && crashAt == name {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // never returns
	}
	if pauseAt != "" && pauseAt == name && pauseFile != "" {
		// The first caller pauses; concurrent callers wait with it; later
		// callers go on.
		pauseOnce.Do(func() {
			go func() {
				defer close(resumed)
				if f, err := os.OpenFile(pauseFile, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); err == nil {
					f.Close()
				}
				for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
					if _, err := os.Stat(pauseFile); err != nil {
						return
					}
				}
			}()
		})
		<-resumed
	}
}
