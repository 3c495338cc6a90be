// Package crashpoint is failure injection for tests of crash recovery: a
// process started with VMSHADOW_CRASH_AT=NAME kills itself with SIGKILL when
// it reaches the point NAME, exactly as an operator's kill -9 or an OOM kill
// would, leaving whatever it had created behind. Without the variable,
// Hit does nothing.
package crashpoint

import (
	"os"
	"syscall"
)

var target = os.Getenv("VMSHADOW_CRASH_AT")

// Hit kills the process if name is the requested crash point.
func Hit(name string) {
	if target != "" && target == name {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // never returns
	}
}
