// Package errs owns vmshadow's error classes and the one table that maps them
// to process exit codes. Packages wrap a class sentinel with %w so that the
// CLI can pick the exit code without knowing which package failed:
//
//	return fmt.Errorf("snapshot set %s already in progress: %w", id, errs.ErrBusy)
//
// An error that wraps no class is a general failure (exit code 1).
package errs

import (
	"context"
	"errors"
)

// Class is an error class with a stable exit code.
type Class struct {
	name string
	code int
}

func (c *Class) Error() string { return c.name }

// ExitCode is the process exit code for this class.
func (c *Class) ExitCode() int { return c.code }

// The classes. Exit codes are a contract with users' scripts: never renumber.
var (
	// ErrUsage: bad command line, flag or argument.
	ErrUsage = &Class{"usage error", 2}
	// ErrBusy: another snapshot set or exclusive repository operation is in progress.
	ErrBusy = &Class{"busy", 3}
	// ErrConsistency: the consistency level asked for with --require was not reached.
	ErrConsistency = &Class{"consistency requirement not met", 4}
	// ErrTimeout: a writer call or the freeze window exceeded its time limit,
	// or a health check's guest never answered within its timeout.
	ErrTimeout = &Class{"time limit exceeded", 5}
	// ErrNotFound: a named snapshot set, backup, disk or VM does not exist.
	ErrNotFound = &Class{"not found", 6}
	// ErrAuth: wrong repository password or credentials.
	ErrAuth = &Class{"authentication failed", 7}
	// ErrCorrupt: data failed verification (hash, MAC, format).
	ErrCorrupt = &Class{"corrupt data", 8}
	// ErrUnsupported: the hypervisor or repository lacks something required
	// (QEMU too old, repository of a newer format version).
	ErrUnsupported = &Class{"unsupported", 9}
	// ErrConnect: cannot reach or speak to the hypervisor or agent socket.
	ErrConnect = &Class{"connection failed", 10}
	// ErrNoSpace: the scratch area or repository has too little space.
	ErrNoSpace = &Class{"no space", 11}
	// ErrInterrupted: the operation was cancelled by a signal.
	ErrInterrupted = &Class{"interrupted", 130}
)

// All lists every class in exit-code order, for documentation and tests.
var All = []*Class{ErrUsage, ErrBusy, ErrConsistency, ErrTimeout, ErrNotFound,
	ErrAuth, ErrCorrupt, ErrUnsupported, ErrConnect, ErrNoSpace, ErrInterrupted}

// ExitCode maps an error to the process exit code: 0 for nil, the code of the
// first class found in the chain, 130 for a cancelled context, 1 otherwise.
func ExitCode(err error) int {
	if err == nil {
		return 0
	}
	var c *Class
	if errors.As(err, &c) {
		return c.code
	}
	if errors.Is(err, context.Canceled) {
		return ErrInterrupted.code
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return ErrTimeout.code
	}
	return 1
}

// ClassName is the short name of the error's class ("busy", "not found", ...),
// or "error" when it has none. It appears as "class" in JSON error objects.
func ClassName(err error) string {
	var c *Class
	if errors.As(err, &c) {
		return c.name
	}
	switch ExitCode(err) {
	case ErrInterrupted.code:
		return ErrInterrupted.name
	case ErrTimeout.code:
		return ErrTimeout.name
	}
	return "error"
}
