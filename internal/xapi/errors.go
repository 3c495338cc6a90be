package xapi

import (
	"errors"
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Error is a failure XAPI reported for a call: an API error code (the
// JSON-RPC error's message) and its parameters. It wraps the vmshadow
// error class of the code, so errs.ExitCode maps it.
type Error struct {
	Method string   // the call, e.g. "VM.snapshot"
	Host   string   // the pool master
	Code   string   // e.g. "HANDLE_INVALID"
	Params []string // the error's parameters (the session reference redacted)
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "XAPI %s: %s failed: %s", e.Host, e.Method, e.Code)
	if len(e.Params) > 0 {
		fmt.Fprintf(&b, " %q", e.Params)
	}
	if h := hints[e.Code]; h != "" {
		b.WriteString(" (" + h + ")")
	}
	return b.String()
}

// Unwrap gives the error class of the code.
func (e *Error) Unwrap() error { return classOf(e.Code) }

// hints explain the codes users meet most.
var hints = map[string]string{
	"SESSION_AUTHENTICATION_FAILED": "wrong user name or password: check --xapi-user and VMSHADOW_XAPI_PASSWORD or --xapi-password-file",
	"SESSION_INVALID":               "the session ended (logged out or expired on the pool)",
	"HANDLE_INVALID":                "the object does not exist (any more)",
	"UUID_INVALID":                  "no object with this UUID",
	"LICENCE_RESTRICTION":           "the pool's licence does not allow this feature",
	"MESSAGE_METHOD_UNKNOWN":        "this XAPI version does not know the call",
	"VDI_IN_USE":                    "the disk is busy",
	"OTHER_OPERATION_IN_PROGRESS":   "another operation on the object is running: try again later",
	"SR_FULL":                       "the storage repository is full",
	"RBAC_PERMISSION_DENIED":        "the account's role does not allow this call: a backup or snapshot set needs the vm-power-admin role, a restore vm-admin",
	"SESSION_AUTHORIZATION_FAILED":  "the user may not log in to this pool: give the subject a role (xe subject-role-add)",
}

// classOf maps API error codes to vmshadow's error classes.
func classOf(code string) error {
	switch code {
	case "SESSION_AUTHENTICATION_FAILED", "SESSION_AUTHORIZATION_FAILED", "SESSION_INVALID", "RBAC_PERMISSION_DENIED", "USER_IS_NOT_LOCAL_SUPERUSER":
		return errs.ErrAuth
	case "HANDLE_INVALID", "UUID_INVALID", "VDI_MISSING", "VM_MISSING_PV_DRIVERS_NOT_FOUND":
		return errs.ErrNotFound
	case "LICENCE_RESTRICTION", "MESSAGE_METHOD_UNKNOWN", "SR_OPERATION_NOT_SUPPORTED", "VDI_NOT_SPARSE", "UNIMPLEMENTED_IN_SM_BACKEND":
		return errs.ErrUnsupported
	case "VDI_IN_USE", "OTHER_OPERATION_IN_PROGRESS", "OPERATION_BLOCKED":
		return errs.ErrBusy
	case "SR_FULL", "SR_BACKEND_FAILURE_44": // 44: "There is insufficient space"
		return errs.ErrNoSpace
	case "TASK_CANCELLED":
		return errs.ErrInterrupted
	}
	return nil
}

// IsCode reports whether err is an XAPI error with one of the codes.
func IsCode(err error, codes ...string) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	for _, c := range codes {
		if e.Code == c {
			return true
		}
	}
	return false
}

// IsGone reports an error that means the object no longer exists, which
// cleanup treats as done.
func IsGone(err error) bool { return IsCode(err, "HANDLE_INVALID", "UUID_INVALID", "VDI_MISSING") }
