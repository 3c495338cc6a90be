package nbdsource

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// nbdkitNoSR serves a sparse 8 MiB file (data at 1-2 MiB) with nbdkit
// without structured replies, so it cannot report allocation.
func nbdkitNoSR(t *testing.T) string {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "nbdkit")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(8 << 20)
	f.WriteAt([]byte(strings.Repeat("x", 1<<20)), 1<<20)
	f.Close()
	sock := filepath.Join(dir, "nbd.sock")
	cmd := exec.Command("nbdkit", "--no-sr", "-r", "-f", "-U", sock, "file", "file="+img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 250; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "nbd+unix:///?socket=" + sock
}

// TestAllocationOptional: a server that cannot report allocation fails the
// source unless allocation is optional; then everything is data, and
// changed ranges given from outside still make the rest Unchanged.
func TestAllocationOptional(t *testing.T) {
	uri := nbdkitNoSR(t)
	ctx := context.Background()
	if _, err := Open(ctx, Options{Name: "xvda", URI: uri, Conns: 1}); !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("without AllocationOptional: %v", err)
	}
	s, err := Open(ctx, Options{Name: "xvda", URI: uri, Conns: 1, AllocationOptional: true})
	if err != nil {
		t.Fatal(err)
	}
	if s.Allocation() {
		t.Error("Allocation() = true for a server without structured replies")
	}
	if got := render(s.Extents(ctx)); got != "0+8388608:data" {
		t.Errorf("extents %s", got)
	}
	s.Close()
	changed := seq(x(0, 1<<20, 0), x(1<<20, 4096, nbd.StateDirty), x(1<<20+4096, 7<<20-4096, 0))
	s, err = Open(ctx, Options{Name: "xvda", URI: uri, Conns: 1, AllocationOptional: true, Changed: changed})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := render(s.Extents(ctx)); got != "0+1048576:unchanged 1048576+4096:data 1052672+7335936:unchanged" {
		t.Errorf("extents with changes %s", got)
	}
	buf := make([]byte, 4096)
	if _, err := s.ReadAt(ctx, buf, 1<<20); err != nil || buf[0] != 'x' {
		t.Fatalf("read: %v %q", err, buf[:1])
	}
}
