// Package testutil holds small helpers shared by tests: finding the external
// programs tests run against (QEMU, qemu-img, qemu-nbd, nbdkit) with the rule
// that in CI (CI=true) a missing program fails the test instead of skipping it.
package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run in CI, where nothing may be skipped for
// lack of a program.
func InCI() bool { return os.Getenv("CI") == "true" }

// NeedCommand returns the path of the named program. When it is missing the
// test fails in CI and is skipped elsewhere.
func NeedCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if InCI() {
			t.Fatalf("%s is required (CI=true) but not installed: run 'make deps'", name)
		}
		t.Skipf("%s not installed (run 'make deps')", name)
	}
	return p
}

// SkipShort skips a test that runs external programs when -short is given.
// In CI -short is never given.
func SkipShort(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs external programs; skipped with -short")
	}
}
